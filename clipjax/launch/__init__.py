"""Launchers: N local processes (clipjax.launch.local) and sweep expansion (clipjax.launch.sweep).

The TPU VM pod and SLURM scripts are shell files in the repository's launch/ folder
(launch/tpu_pod.sh, launch/slurm.sbatch); the sweep launcher starts them by that path.
"""
