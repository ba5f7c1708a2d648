"""SLURM launches: the host-list and rendezvous logic of launch_env, a 2-task ``srun``-style run
of main.py (no torchrun) that equals the same run under torchrun, the one-line error of a
launched process whose device cannot be used, and run_with_submitit.py on submitit's local
executor, preempted after its first checkpoint and requeued.

Run: ``python -m pytest -q tests/test_slurm.py`` from the repository root.
"""
import os
import random
import signal
import sys
import time

import pytest
import torch

from multiproc import (REPO_ROOT, TINY_RUN, Processes, assert_same_weights, checkpoint_weights,
                       child_env, port_is_free, run_ok, torchrun, tree_args, write_tree)

sys.path.insert(0, str(REPO_ROOT))

import launch_env  # noqa: E402
from launch_env import Launch, LaunchError, detect_launch, expand_nodelist  # noqa: E402

TWO_EPOCHS = ['--epochs', '2']


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """70 training images (two steps of 16 per process with two processes), 20 validation."""
    return write_tree(tmp_path_factory.mktemp('tree'), 7, 2)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT',
                 'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS', 'SLURM_LOCALID',
                 'SLURM_JOB_NODELIST', 'SLURM_NODELIST', 'SLURM_JOB_ID'):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---------------------------------------------------------------------------------------------
# Host lists, ports, launch detection
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('nodelist, hosts', [
    ('node17', ['node17']),
    ('node[01-04,07]', ['node01', 'node02', 'node03', 'node04', 'node07']),
    ('gpu[8-10],cpu3', ['gpu8', 'gpu9', 'gpu10', 'cpu3']),
    ('a[1,3],b[098-101]', ['a1', 'a3', 'b098', 'b099', 'b100', 'b101']),
    ('rack[1-2]-n[1,3]', ['rack1-n1', 'rack1-n3', 'rack2-n1', 'rack2-n3']),
    ('127.0.0.[1-2]', ['127.0.0.1', '127.0.0.2']),
    (' x[7] ', ['x7']),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize('nodelist', ['node[01-04', 'node01-04]', 'n[3-1]', 'n[a-b]', 'n[[1]]',
                                      '', ','])
def test_expand_nodelist_rejects_malformed(nodelist):
    with pytest.raises(ValueError):
        expand_nodelist(nodelist)


def test_slurm_master_port_is_stable_and_in_range():
    base, span = launch_env.SLURM_PORT_BASE, launch_env.SLURM_PORT_SPAN
    assert launch_env.slurm_master_port('123456') == base + 123456 % span
    assert launch_env.slurm_master_port('7') == base + 7
    assert launch_env.slurm_master_port('7') != launch_env.slurm_master_port('8')
    ports = {launch_env.slurm_master_port(str(job)) for job in range(0, 10 ** 6, 997)}
    assert min(ports) >= base and max(ports) < base + span < 32768
    with pytest.raises(ValueError, match='12_3'):
        launch_env.slurm_master_port('12_3')


def test_detect_launch(clean_env):
    assert detect_launch() is None
    clean_env.setenv('SLURM_PROCID', '0')
    clean_env.setenv('SLURM_NTASKS', '4')
    assert detect_launch() is None  # the batch script of a 4-task job: no step, alone
    clean_env.setenv('SLURM_STEP_NUM_TASKS', '1')
    assert detect_launch() is None  # srun -n 1: alone
    clean_env.setenv('SLURM_PROCID', '5')
    clean_env.setenv('SLURM_STEP_NUM_TASKS', '8')
    clean_env.setenv('SLURM_LOCALID', '1')
    clean_env.setenv('SLURM_JOB_NODELIST', 'gpu[07-08]')
    clean_env.setenv('SLURM_JOB_ID', '4242')
    port = launch_env.slurm_master_port('4242')
    assert detect_launch() == Launch(launcher='srun', rank=5, world_size=8, local_rank=1,
                                     init_method=f'tcp://gpu07:{port}')
    clean_env.setenv('MASTER_PORT', '23456')
    assert detect_launch().init_method == 'tcp://gpu07:23456'
    clean_env.setenv('MASTER_ADDR', 'head')
    assert detect_launch().init_method == 'tcp://head:23456'
    assert detect_launch(dist_url='tcp://other:1').init_method == 'tcp://other:1'
    # torchrun's variables win over SLURM's (torchrun started inside an allocation).
    clean_env.setenv('RANK', '2')
    clean_env.setenv('WORLD_SIZE', '4')
    clean_env.setenv('LOCAL_RANK', '0')
    assert detect_launch() == Launch(launcher='torchrun', rank=2, world_size=4, local_rank=0,
                                     init_method='env://')


@pytest.mark.parametrize('variables, needle', [
    ({'SLURM_JOB_NODELIST': 'n[1-'}, 'SLURM_JOB_NODELIST'),
    ({'SLURM_JOB_NODELIST': 'n1'}, 'SLURM_JOB_ID'),
    ({}, 'SLURM_JOB_NODELIST'),
    ({'SLURM_PROCID': '2'}, 'SLURM_PROCID=2'),
    ({'SLURM_STEP_NUM_TASKS': 'two'}, 'SLURM_STEP_NUM_TASKS'),
])
def test_detect_launch_errors_name_the_variable(clean_env, variables, needle):
    clean_env.setenv('SLURM_PROCID', '0')
    clean_env.setenv('SLURM_STEP_NUM_TASKS', '2')
    for name, value in variables.items():
        clean_env.setenv(name, value)
    with pytest.raises(LaunchError, match=needle) as raised:
        detect_launch()
    assert raised.value.exit_status == 2


# ---------------------------------------------------------------------------------------------
# A launched process never falls back to another device
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
@pytest.mark.parametrize('launcher', ['torchrun', 'srun'])
def test_launched_process_without_cuda_is_a_one_line_error(clean_env, capsys, tmp_path,
                                                          launcher):
    import main
    variables = ({'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1'} if launcher == 'torchrun'
                 else {'SLURM_PROCID': '1', 'SLURM_STEP_NUM_TASKS': '2', 'SLURM_LOCALID': '1',
                       'SLURM_JOB_NODELIST': 'localhost', 'SLURM_JOB_ID': '99'})
    for name, value in variables.items():
        clean_env.setenv(name, value)
    status = main.cli(['--data-set', 'DIGITS', '--device', 'cuda', '--eval',
                       '--output_dir', str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count('\n') == 1 and 'Traceback' not in err, err
    assert err.startswith('main.py: error: --device cuda: CUDA is not available on ')
    assert f'(rank 1 of 2, started by {launcher})' in err


def test_bad_device_name_under_a_launcher(clean_env, capsys):
    import main
    for name, value in {'RANK': '0', 'WORLD_SIZE': '2'}.items():
        clean_env.setenv(name, value)
    assert main.cli(['--data-set', 'DIGITS', '--device', 'gpu0', '--eval']) == 2
    assert capsys.readouterr().err == ("main.py: error: --device 'gpu0' is not a device name "
                                       "(cuda, cuda:N, cpu)\n")


# ---------------------------------------------------------------------------------------------
# Check 2: srun-style processes form one group and train as torchrun's do
# ---------------------------------------------------------------------------------------------

def slurm_job_id_with_free_port():
    """A job id whose derived port is free here, so that the rendezvous can bind it."""
    candidates = random.Random().sample(range(10 ** 5, 10 ** 6), 50)
    return next(str(job) for job in candidates
                if port_is_free(launch_env.slurm_master_port(str(job))))


def test_srun_launch_equals_torchrun(tree, tmp_path):
    srun_dir, torchrun_dir = tmp_path / 'srun', tmp_path / 'torchrun'
    args = [*tree_args(tree), *TINY_RUN, *TWO_EPOCHS]
    job_id = slurm_job_id_with_free_port()
    # As `srun --ntasks 2 python main.py ...` on one node: no MASTER_ADDR/PORT, so the first
    # host of the (bracketed) node list and the port derived from the job id.
    launches = [([sys.executable, 'main.py', *args, '--output_dir', srun_dir],
                 child_env(SLURM_PROCID=rank, SLURM_STEP_NUM_TASKS=2, SLURM_LOCALID=rank,
                           SLURM_JOB_NODELIST='127.0.0.[1-4]', SLURM_JOB_ID=job_id))
                for rank in range(2)]
    results = Processes(launches).wait()
    for rank, (status, output) in enumerate(results):
        assert status == 0, f'rank {rank} exit {status}\n{output[-4000:]}'
    port = launch_env.slurm_master_port(job_id)
    assert f'| distributed init (rank 0/2, gloo): tcp://127.0.0.1:{port} (srun)' in results[0][1]
    assert 'Start training' in results[0][1] and 'Start training' not in results[1][1]

    output = run_ok(torchrun(*args, '--output_dir', torchrun_dir))
    assert '(rank 0/2, gloo): env:// (torchrun)' in output
    assert_same_weights(checkpoint_weights(srun_dir / 'checkpoint.pth'),
                        checkpoint_weights(torchrun_dir / 'checkpoint.pth'))


# ---------------------------------------------------------------------------------------------
# Check 1: run_with_submitit.py on submitit's local executor, preempted and requeued
# ---------------------------------------------------------------------------------------------

# A Trainer that, in its first run only, stops rank 0 at the start of epoch 1 (after the
# checkpoint of epoch 0) until the preemption signal arrives; it records each rank's pid.
PAUSING_TRAINER = '''
import os
import time

import run_with_submitit
import samplers

PAUSE_EPOCH = 1
MAX_PAUSE_S = 300


class PausingTrainer(run_with_submitit.Trainer):
    def __call__(self):
        rank = os.environ['SUBMITIT_LOCAL_GLOBALID']
        marker = os.path.join(self.args.job_dir, f'paused_rank{rank}')
        real_set_epoch = samplers.SeededSampler.set_epoch

        def set_epoch(sampler, epoch, *args, **kwargs):
            if epoch == PAUSE_EPOCH and not os.path.exists(marker):
                with open(marker, 'w') as handle:
                    handle.write(str(os.getpid()))
                if rank == '0':
                    time.sleep(MAX_PAUSE_S)  # the signal's handler ends the sleep
            return real_set_epoch(sampler, epoch, *args, **kwargs)

        samplers.SeededSampler.set_epoch = set_epoch
        return super().__call__()
'''
SUBMITIT_TIMEOUT_S = 300


def job_args(tree, job_dir):
    import run_with_submitit
    argv = [*tree_args(tree), *TINY_RUN, *TWO_EPOCHS, '--cluster', 'local', '--ngpus', '0',
            '--tasks_per_node', '2', '--nodes', '1', '--timeout', '30', '--job_dir', str(job_dir)]
    args = run_with_submitit.get_args_parser().parse_args(argv)
    run_with_submitit.check_job_args(args)
    return args


def wait_for_job(job, deadline):
    """Waits until the job's local controller (and so every task) has ended."""
    while job.get_info()['jobState'] == 'RUNNING':
        assert time.time() < deadline, f'job {job.job_id} still running'
        time.sleep(0.2)


def test_submitit_job_requeued_after_preemption_resumes_exactly(tree, tmp_path, monkeypatch):
    import run_with_submitit
    (tmp_path / 'pausing_trainer.py').write_text(PAUSING_TRAINER)
    for name, value in child_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv('PYTHONPATH', f'{REPO_ROOT}:{tmp_path}')
    monkeypatch.syspath_prepend(str(tmp_path))
    from pausing_trainer import PausingTrainer

    reference_dir, preempted_dir = tmp_path / 'reference', tmp_path / 'preempted'
    killed_dir = tmp_path / 'killed'
    deadline = time.time() + SUBMITIT_TIMEOUT_S
    reference = run_with_submitit.submit(job_args(tree, reference_dir))
    paused = {}
    for job_dir in (preempted_dir, killed_dir):
        args = job_args(tree, job_dir)
        paused[job_dir] = run_with_submitit.build_executor(args).submit(PausingTrainer(args))
    for job_dir, job in paused.items():
        marker = job_dir / 'paused_rank0'
        while not marker.exists() or not marker.read_text():
            assert time.time() < deadline and job.get_info()['jobState'] == 'RUNNING', \
                job.stderr()
            time.sleep(0.1)
    preempted = paused[preempted_dir]
    # What SLURM does before a timeout or preemption (--signal USR2): submitit's handler on
    # rank 0 saves the submission from Trainer.checkpoint and requeues the job.
    os.kill(int((preempted_dir / 'paused_rank0').read_text()), signal.SIGUSR2)
    # The other job's tasks are killed after its first checkpoint (SIGKILL: as a node failure,
    # or scancel's last resort), then the job is submitted again with the same --job_dir: it
    # continues from that checkpoint.
    for rank in range(2):
        marker = killed_dir / f'paused_rank{rank}'
        while not marker.exists() or not marker.read_text():
            assert time.time() < deadline, f'rank {rank} of the job to kill did not reach epoch 1'
            time.sleep(0.1)
        os.kill(int(marker.read_text()), signal.SIGKILL)
    wait_for_job(paused[killed_dir], deadline)
    resubmitted = run_with_submitit.submit(job_args(tree, killed_dir))
    wait_for_job(preempted, deadline)
    wait_for_job(reference, deadline)
    wait_for_job(resubmitted, deadline)
    resubmitted_log = resubmitted.stdout() + resubmitted.stderr()
    assert f'resumed {killed_dir / "checkpoint.pth"} at epoch 1' in resubmitted_log, \
        resubmitted_log[-4000:]
    assert_same_weights(checkpoint_weights(reference_dir / 'checkpoint.pth'),
                        checkpoint_weights(killed_dir / 'checkpoint.pth'))

    assert reference.results()[0] is not None
    log = preempted.stdout() + preempted.stderr()
    assert 'Requeued job' in log, log[-4000:]
    checkpoint = preempted_dir / 'checkpoint.pth'
    assert f'resumed {checkpoint} at epoch 1' in log, log[-4000:]
    assert [result is not None for result in preempted.results()] == [True, True]
    assert_same_weights(checkpoint_weights(reference_dir / 'checkpoint.pth'),
                        checkpoint_weights(checkpoint))


def test_submitit_help_and_a_requeued_finetuning_keeps_its_flag(tmp_path):
    import subprocess
    import run_with_submitit
    shown = subprocess.run([sys.executable, str(REPO_ROOT / 'run_with_submitit.py'), '--help'],
                           capture_output=True, text=True)
    assert shown.returncode == 0 and '%j is the job id' in shown.stdout
    args = run_with_submitit.get_args_parser().parse_args(
        ['--finetune', 'source.pth', '--output_dir', str(tmp_path)])
    (tmp_path / 'checkpoint.pth').write_bytes(b'')
    run_with_submitit.resume_from_job_dir(args)
    # main.py resumes and does not read --finetune again, but keeps finetuning's eval mode.
    assert (args.resume, args.finetune) == (str(tmp_path / 'checkpoint.pth'), 'source.pth')


def test_submitit_refuses_an_unwritable_output_dir_before_submitting(tree, tmp_path, capsys,
                                                                      monkeypatch):
    import run_with_submitit
    monkeypatch.setattr(run_with_submitit, 'submit', lambda args: pytest.fail('submitted'))
    output = tmp_path / 'a_file'
    output.write_text('not a folder')
    with pytest.raises(SystemExit) as stop:
        run_with_submitit.cli([*tree_args(tree), *TINY_RUN, '--cluster', 'local', '--ngpus', '0',
                               '--tasks_per_node', '1', '--job_dir', str(tmp_path / 'job'),
                               '--output_dir', str(output / 'out')])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f'run_with_submitit.py: error: --output_dir {output / "out"} is not '
                          f'writable') and err.count('\n') == 1


@pytest.mark.parametrize('flags, message', [
    (['--nodes', '2', '--cluster', 'local'],
     '--nodes 2: --cluster local runs the job on this one machine'),
    (['--nodes', '2'], '--nodes 2: without srun here submitit runs the job on this one machine'),
    (['--resume', 'missing.pth', '--eval'], '--resume missing.pth: no such file'),
    (['--finetune', 'missing.pth'], '--finetune missing.pth: no such file'),
])
def test_submitit_refuses_a_job_that_cannot_run_before_queueing_it(tree, tmp_path, capsys,
                                                                  monkeypatch, flags, message):
    import run_with_submitit
    monkeypatch.setattr(run_with_submitit, 'submit', lambda args: pytest.fail('submitted'))
    monkeypatch.setattr(run_with_submitit.shutil, 'which', lambda name: None)  # no SLURM here
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_with_submitit.cli([*tree_args(tree), *TINY_RUN, '--ngpus', '0', '--tasks_per_node',
                               '1', '--job_dir', str(tmp_path / 'job'), *flags])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f'run_with_submitit.py: error: {message} (see --help)\n'
    assert not (tmp_path / 'job').exists()
