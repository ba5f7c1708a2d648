"""Submits MTViT training (main.py) to a SLURM cluster through submitit.

One task per GPU (``--ngpus`` per node on ``--nodes`` nodes); every main.py flag passes through.
The job writes its logs and outputs into ``--job_dir``. On preemption or timeout submitit
requeues the job (SLURM signals it ``--signal_delay_s`` before the end), and the requeued job
resumes from ``job_dir/checkpoint.pth``; so does a job submitted again with the same
``--job_dir``.

    python run_with_submitit.py --nodes 2 --ngpus 8 --timeout 2880 --partition gpu \\
        --job_dir /nfs/$USER/mtvit_s --model deit_small_patch16_shrink_base --multi-scale \\
        --batch-size 64 --dist-eval --data-path /path/to/imagenet

``--cluster local`` runs the tasks on this machine (submitit's local executor), which is how
the tests exercise the requeue without SLURM.
"""
import argparse
import os
import shutil
import sys
from typing import List, Optional

import main as mtvit_main
from launch_env import slurm_master_port
from utils import MachineError, OneLineErrorParser, check_output_dir

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TIMEOUT_MIN = 60 * 48
DEFAULT_SIGNAL_DELAY_S = 120  # time to finish the step and leave before SLURM kills the job
JOB_ID_PATTERN = '%j'  # submitit's (and sbatch's) placeholder for the job id


def get_args_parser() -> argparse.ArgumentParser:
    """main.py's flags, then the job's."""
    parser = OneLineErrorParser(description='Submit MTViT training to SLURM with submitit',
                                command='run_with_submitit.py',
                                parents=[mtvit_main.get_args_parser()], add_help=False)
    group = parser.add_argument_group('SLURM job (submitit)')
    group.add_argument('--nodes', default=1, type=int, help='nodes to request')
    group.add_argument('--ngpus', default=8, type=int, help='GPUs per node; one task per GPU')
    group.add_argument('--tasks_per_node', default=None, type=int,
                       help='tasks (processes) per node (default: --ngpus; give it for CPU jobs '
                            'with --ngpus 0 --device cpu)')
    group.add_argument('--cpus_per_task', default=10, type=int,
                       help='CPU cores per task (data-loading workers and the task itself)')
    group.add_argument('--mem_per_gpu', default=40, type=int, help='GB of memory per task')
    group.add_argument('--timeout', default=DEFAULT_TIMEOUT_MIN, type=int,
                       help='minutes of the job (each requeued job gets as many again)')
    group.add_argument('--partition', default='', type=str, help='SLURM partition')
    group.add_argument('--job_dir', default=os.path.join('submitit_jobs', JOB_ID_PATTERN),
                       type=str, help='folder of the logs, and of the outputs unless --output_dir '
                                      'is given; %%j is the job id (give a fixed folder to resume '
                                      'by submitting again)')
    group.add_argument('--comment', default='', type=str, help='SLURM --comment')
    group.add_argument('--constraint', default='', type=str, help='SLURM --constraint')
    group.add_argument('--use_volta32', action='store_true',
                       help='ask for 32 GB V100 GPUs (adds the volta32gb constraint)')
    group.add_argument('--signal_delay_s', default=DEFAULT_SIGNAL_DELAY_S, type=int,
                       help='seconds before the timeout at which the job is signalled to requeue')
    group.add_argument('--max_num_timeout', default=3, type=int,
                       help='requeues after timeouts before the job gives up (preemptions '
                            'do not count)')
    group.add_argument('--cluster', default=None, choices=('slurm', 'local', 'debug'),
                       help='submitit executor (default: slurm where srun exists, else local)')
    return parser


def resume_from_job_dir(args: argparse.Namespace) -> None:
    """Continue from output_dir/checkpoint.pth when it exists (a requeued or resubmitted job):
    the exact resume of main.py. A --finetune stays: main.py then does not read it again, and the
    run keeps finetuning's eval mode."""
    checkpoint = mtvit_main.checkpoint_path_of(args)
    if checkpoint and os.path.exists(checkpoint):
        args.resume = checkpoint


class Trainer:
    """What every task of the job runs: main.main with the submitted flags.

    submitit calls ``checkpoint`` on rank 0 when the job is preempted or times out and requeues
    the submission it returns; the requeued tasks find job_dir/checkpoint.pth and resume.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self):
        import submitit
        job = submitit.JobEnvironment()
        args = argparse.Namespace(**vars(self.args))
        args.job_dir = args.job_dir.replace(JOB_ID_PATTERN, str(job.job_id))
        args.output_dir = args.output_dir or args.job_dir
        if job.num_tasks > 1:
            # torchrun's variables: main.py's init_distributed takes them as they are. The
            # port is the one a plain srun of this job would derive from its id.
            os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks),
                              LOCAL_RANK=str(job.local_rank), MASTER_ADDR=job.hostnames[0],
                              MASTER_PORT=str(slurm_master_port(str(job.raw_job_id))))
        resume_from_job_dir(args)
        return mtvit_main.main(args)

    def checkpoint(self, *args, **kwargs):
        """The submission to requeue: this trainer again (it resumes when it starts)."""
        import submitit
        return submitit.helpers.DelayedSubmission(type(self)(self.args))


def check_job_args(args: argparse.Namespace) -> None:
    """Rejects what cannot be submitted, naming the flag (UsageError), before anything is."""
    mtvit_main.check_args(args)
    for flag, value, least in (('--nodes', args.nodes, 1), ('--ngpus', args.ngpus, 0),
                               ('--timeout', args.timeout, 1),
                               ('--tasks_per_node', args.tasks_per_node or 1, 1)):
        if value < least:
            raise mtvit_main.UsageError(f'{flag} {value} must be at least {least}')
    if args.ngpus == 0 and args.tasks_per_node is None:
        raise mtvit_main.UsageError('--ngpus 0 needs --tasks_per_node (a CPU job)')
    here = (f'--cluster {args.cluster} runs the job' if args.cluster in ('local', 'debug') else
            'without srun here submitit runs the job' if args.cluster is None
            and shutil.which('srun') is None else None)
    if here and args.nodes > 1:
        raise mtvit_main.UsageError(f'--nodes {args.nodes}: {here} on this one machine')
    # The job would fail on its node, after waiting in the queue.
    for flag, path in (('--resume', args.resume), ('--finetune', args.finetune),
                       ('--teacher-path', args.teacher_path)):
        if path and not path.startswith(('http://', 'https://')) and not os.path.isfile(path):
            raise mtvit_main.UsageError(f'{flag} {path}: no such file')


def build_executor(args: argparse.Namespace):
    """The submitit executor of the job the flags describe (logs in --job_dir)."""
    import submitit
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster=args.cluster,
                                     slurm_max_num_timeout=args.max_num_timeout,
                                     local_max_num_timeout=args.max_num_timeout)
    slurm = {'slurm_signal_delay_s': args.signal_delay_s}
    constraints = [name for name in (args.constraint, 'volta32gb' if args.use_volta32 else '')
                   if name]
    if constraints:
        slurm['slurm_constraint'] = '&'.join(constraints)
    if args.comment:
        slurm['slurm_comment'] = args.comment
    if args.partition:
        slurm['slurm_partition'] = args.partition
    tasks_per_node = args.tasks_per_node or args.ngpus
    executor.update_parameters(
        name='mtvit', nodes=args.nodes, gpus_per_node=args.ngpus, tasks_per_node=tasks_per_node,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_per_gpu * tasks_per_node,
        timeout_min=args.timeout, **slurm)
    return executor


def submit(args: argparse.Namespace):
    """Submits the job the (checked) flags describe; returns submitit's Job."""
    # The tasks import main.py and this file wherever they start.
    os.environ['PYTHONPATH'] = os.pathsep.join(
        path for path in (REPO_DIR, os.environ.get('PYTHONPATH', '')) if path)
    return build_executor(args).submit(Trainer(args))


def cli(argv: Optional[List[str]] = None) -> int:
    """Command-line entry: submits the job and prints its id, or one line for bad flags."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        check_job_args(args)
        if args.output_dir:  # where the job will write, proven writable before it is queued
            check_output_dir(args.output_dir)
    except (mtvit_main.UsageError, MachineError) as error:
        parser.error(str(error))
    try:
        job = submit(args)
    except (RuntimeError, OSError) as error:  # no srun here (--cluster slurm), --job_dir unwritable
        parser.exit(1, f'run_with_submitit.py: error: {error}\n')
    outputs = f', outputs in {args.output_dir}' if args.output_dir else ''
    print(f'Submitted job {job.job_id}: logs in '
          f'{args.job_dir.replace(JOB_ID_PATTERN, str(job.job_id))}{outputs}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(cli())
