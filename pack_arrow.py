"""Packing ImageFolder trees into Arrow files, and the data-preparation command line.

``python pack_arrow.py pack --src TREE --dst DIR`` packs ``TREE/train`` and ``TREE/val`` into
``DIR/train.arrow`` and ``DIR/val.arrow``, which ``datasets.ArrowImageDataset`` (``--data-set
ARROW``) memory-maps; ``python pack_arrow.py export-digits --dst DIR`` writes the embedded DIGITS
split as an ImageFolder tree. ``python datasets.py ...`` runs the same command line.
"""
import argparse
import json
import os
import sys

from atomic_write import replacing_together
from datasets import (ARROW_CLASSES_KEY, ARROW_FORMAT_KEY, ARROW_FORMAT_VERSION, DatasetError,
                      check_split_dir, export_digits_imagefolder, open_image_folder)

DEFAULT_ROWS_PER_BATCH = 512
# A batch is also flushed past this many encoded bytes, so a few huge files cannot exhaust memory.
MAX_BATCH_BYTES = 256 * 1024 * 1024
PACK_PROGRESS_EVERY = 10000


def _arrow_schema(classes):
    import pyarrow as pa

    return pa.schema(
        [('image', pa.large_binary()), ('label', pa.int32()), ('path', pa.string())],
        metadata={ARROW_FORMAT_KEY: ARROW_FORMAT_VERSION,
                  ARROW_CLASSES_KEY: json.dumps(list(classes)).encode('utf-8')})


def _pack_split(split_dir, dst_path, rows_per_batch, progress):
    import pyarrow as pa

    folder = open_image_folder(os.path.dirname(split_dir), os.path.basename(split_dir))
    schema = _arrow_schema(folder.classes)
    columns = {'image': [], 'label': [], 'path': []}
    pending_bytes = 0

    def flush(writer):
        """Writes the rows gathered so far as one record batch."""
        writer.write_batch(pa.record_batch([pa.array(columns[name], type=schema.field(name).type)
                                            for name in schema.names], schema=schema))
        for values in columns.values():
            values.clear()

    with pa.OSFile(dst_path, 'wb') as sink, pa.ipc.new_file(sink, schema) as writer:
        for count, (path, label) in enumerate(folder.samples, start=1):
            try:
                with open(path, 'rb') as handle:
                    encoded = handle.read()
            except OSError as exc:
                raise DatasetError(f'cannot read image {path}: {exc.strerror or exc}') from exc
            columns['image'].append(encoded)
            columns['label'].append(label)
            columns['path'].append(os.path.relpath(path, split_dir))
            pending_bytes += len(encoded)
            if len(columns['label']) >= rows_per_batch or pending_bytes >= MAX_BATCH_BYTES:
                flush(writer)
                pending_bytes = 0
            if progress is not None and count % PACK_PROGRESS_EVERY == 0:
                progress(f'{split_dir}: packed {count}/{len(folder.samples)} images')
        if columns['label']:
            flush(writer)
    return len(folder.samples)


def pack_imagefolder(src_root, dst_root, rows_per_batch=DEFAULT_ROWS_PER_BATCH, splits=('train', 'val'),
                     progress=None):
    """Pack ImageFolder trees ``src_root/<split>`` into Arrow IPC files ``dst_root/<split>.arrow``.

    Columns: ``image`` (the file's encoded bytes, untouched), ``label`` (int32, ImageFolder's
    index) and ``path`` (path relative to the split folder, for error messages); the class names
    are JSON in the schema metadata. Rows keep ImageFolder's order and are written in record
    batches of at most ``rows_per_batch`` rows (or ``MAX_BATCH_BYTES``), so memory stays bounded.
    Every split is validated before anything is written, and the new files replace earlier ones
    only once every split is packed. ``progress``, if given, is called with a status line every
    ``PACK_PROGRESS_EVERY`` images. Returns ``{split: image count}``.
    """
    if rows_per_batch < 1:
        raise DatasetError(f'rows_per_batch must be at least 1, got {rows_per_batch}')
    split_dirs = {split: check_split_dir(src_root, split) for split in splits}
    os.makedirs(dst_root, exist_ok=True)
    # Every split is staged before any replaces its earlier file: a failure leaves the earlier
    # pair, not a new val.arrow beside an old train.arrow.
    with replacing_together([os.path.join(dst_root, f'{split}.arrow') for split in split_dirs]
                            ) as staged:
        return {split: _pack_split(split_dir, dst_path, rows_per_batch, progress)
                for (split, split_dir), dst_path in zip(split_dirs.items(), staged)}


def _parse_command_line(argv):
    parser = argparse.ArgumentParser(description='Prepare MTViT datasets.')
    commands = parser.add_subparsers(dest='command', required=True)
    pack = commands.add_parser('pack', help='pack an ImageFolder tree (train/ and val/) into Arrow files')
    pack.add_argument('--src', required=True, help='tree with train/<class>/<image> and val/<class>/<image>')
    pack.add_argument('--dst', required=True, help='output folder for train.arrow and val.arrow')
    pack.add_argument('--rows-per-batch', type=int, default=DEFAULT_ROWS_PER_BATCH,
                      help='images per Arrow record batch')
    export = commands.add_parser('export-digits', help='write the DIGITS split as an ImageFolder tree')
    export.add_argument('--dst', required=True, help='output folder (gets train/ and val/)')
    return parser.parse_args(argv)


def main(argv=None):
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Data problems (``DatasetError``) and file-system errors print one ``pack_arrow.py: error:``
    line (naming the file, or ``--dst``) on stderr and return 2; bad flags exit 2 through
    argparse.
    """
    args = _parse_command_line(argv)
    try:
        if args.command == 'pack':
            counts = pack_imagefolder(args.src, args.dst, rows_per_batch=args.rows_per_batch, progress=print)
        else:
            counts = export_digits_imagefolder(args.dst)
    except (DatasetError, OSError) as err:
        if isinstance(err, OSError) and err.strerror:  # a full disk names no file of its own
            err = f'{err.strerror} ({err.filename or args.dst})'
        print(f'pack_arrow.py: error: {err}', file=sys.stderr)
        return 2
    print(', '.join(f'{split}: {count} images' for split, count in counts.items()) + f' written to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
