"""Checkpoints given as URLs (``--finetune``/``--resume``/``--teacher-path http(s)://...``):
downloaded once into the torch hub cache, then loaded with ``weights_only=True`` like a local
file; a download failure is one line naming the URL. A loopback HTTP server in a thread serves
the files.

Run: ``python -m pytest -q tests/test_checkpoint_url.py`` from the repository root.
"""
import functools
import http.server
import os
import pickle
import sys
import threading

import pytest
import timm
import torch

from multiproc import REPO_ROOT, tree_args, write_tree

sys.path.insert(0, str(REPO_ROOT))

import main  # noqa: E402
from checkpoints import CheckpointError, load_checkpoint  # noqa: E402

EVAL_ARGS = ['--model', 'deit_tiny_patch16_shrink_base', '--input-size', '32', '--batch-size', '16',
             '--num_workers', '0', '--device', 'cpu', '--eval']


class CountingServer:
    """``http.server`` on 127.0.0.1 serving ``directory`` from a thread; ``requests`` counts
    the GET requests it answered (any status)."""

    def __init__(self, directory):
        self.requests = 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                super().do_GET()

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ('127.0.0.1', 0), functools.partial(Handler, directory=str(directory)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name):
        return f'http://127.0.0.1:{self.httpd.server_address[1]}/{name}'

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """(server, served folder); the torch hub cache in tmp_path/torch_home; no launcher."""
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS',
                 'SLURM_STEP_NUM_TASKS'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    folder = tmp_path / 'served'
    folder.mkdir()
    server = CountingServer(folder)
    yield server, folder
    server.stop()


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp('tree'), 1, 2)


def run_main(argv):
    return main.main(main.get_args_parser().parse_args([str(arg) for arg in argv]))


def test_finetune_from_url_downloads_once(served, tree, tmp_path, capsys):
    server, folder = served
    torch.manual_seed(5)
    source = timm.create_model('deit_tiny_patch16_shrink_base', img_size=32, num_classes=10)
    torch.save({'model': source.state_dict()}, folder / 'x.pth')
    url = server.url('x.pth')
    cached = tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'x.pth'

    from_url = run_main([*tree_args(tree), *EVAL_ARGS, '--finetune', url])
    out = capsys.readouterr().out
    assert f'downloading {url} to {cached}' in out
    assert f'finetune from {url}: missing keys [], unexpected keys []' in out
    assert server.requests == 1 and cached.read_bytes() == (folder / 'x.pth').read_bytes()

    # The same weights as the local file, and not other weights of the same model.
    from_file = run_main([*tree_args(tree), *EVAL_ARGS, '--finetune', folder / 'x.pth'])
    torch.manual_seed(6)
    other = timm.create_model('deit_tiny_patch16_shrink_base', img_size=32, num_classes=10)
    torch.save({'model': other.state_dict()}, tmp_path / 'other.pth')
    untouched = run_main([*tree_args(tree), *EVAL_ARGS, '--resume', tmp_path / 'other.pth'])
    capsys.readouterr()
    assert from_url == from_file
    assert from_url['loss'] != untouched['loss']

    # A second run takes the cached copy: no request, even with the server gone.
    server.stop()
    again = run_main([*tree_args(tree), *EVAL_ARGS, '--finetune', url])
    assert again == from_url
    assert 'downloading' not in capsys.readouterr().out
    assert server.requests == 1


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_url_pickle_that_runs_code_is_refused(served, tmp_path, capsys):
    server, folder = served
    marker = tmp_path / 'code_ran'
    (folder / 'evil.pth').write_bytes(pickle.dumps({'model': RunsCode(marker)}, protocol=2))
    url = server.url('evil.pth')
    with pytest.raises(CheckpointError, match=r'refusing to load .*(posix|os)\.system'):
        load_checkpoint(url)
    assert main.cli([*EVAL_ARGS, '--data-set', 'DIGITS', '--finetune', url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'main.py: error: {url}: refusing to load ') and err.count('\n') == 1
    assert not marker.exists()


def test_download_failure_is_one_line_naming_the_url(served, capsys):
    server, _ = served
    missing = server.url('missing.pth')
    with pytest.raises(CheckpointError, match=f'cannot download checkpoint {missing}: .*404'):
        load_checkpoint(missing)
    server.stop()
    unreachable = server.url('x.pth')
    assert main.cli([*EVAL_ARGS, '--data-set', 'DIGITS', '--resume', unreachable]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'main.py: error: cannot download checkpoint {unreachable}: ')
    assert err.count('\n') == 1 and 'Traceback' not in err
