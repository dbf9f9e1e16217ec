"""``str(plan)``: how a :class:`~spyke_lora.Plan` reads, the lines ``spyke-lora plan`` prints (docs/preflight.md).

:class:`PlanText` is the base class ``Plan`` takes its ``__str__`` from: the text apart from the data, which it reads
from the plan's own fields (``_data``), without importing it.
"""

from __future__ import annotations

__all__ = ["PlanText"]


class PlanText:
    """The text of a plan: base model, device, dataset, processes, steps, checkpoints, samples, validation, memory,
    disk, then each warning that is not a device correction (those are shown under the device)."""

    def __str__(self) -> str:
        p = self
        lines = [
            f"base model      {p.base_model} ({p.model_family})",
            f"device          {p.device}, mixed precision {p.mixed_precision}",
            *(f"  corrected: {c}" for c in p.corrections),
            "dataset",
            *(line for s in p.subsets for line in s.lines()),
            *self._launch_lines(),
            f"steps           {p.steps_per_epoch} per epoch x {p.epochs} epochs = {p.total_steps}",
            *self._resume_lines(),
            "checkpoints     " + (", ".join(str(step) for step, _ in p.checkpoints) or "none") + ", final",
            *(f"  {path}" for _, path in p.checkpoints),
            f"  {p.final_path}",
            "samples         " + self._samples(),
            *self._validation_lines(),
            *(p.memory.lines() if p.memory else []),
            f"disk            about {p.estimated_disk_bytes / 1e6:.0f} MB",
            *(f"warning: {w}" for w in p.warnings if w not in p.corrections),
        ]
        return "\n".join(lines)

    def _launch_lines(self) -> list[str]:
        """A multi-process run's processes and how they share an epoch's batches (none for one process)."""
        p, launch = self, self.launch
        if not launch.multi_process:
            return []
        machines = f"{launch.num_machines} machines" if launch.num_machines > 1 else "1 machine"
        accumulation = f" x {p.gradient_accumulation_steps} accumulated" if p.gradient_accumulation_steps > 1 else ""
        batches, processes = p.batches_per_epoch, p.processes
        return [
            f"processes       {processes} on {machines} ({launch.local_processes} here, machine_rank "
            f"{launch.machine_rank}), started by accelerate launch",
            f"  batch {p.train_batch_size} per process x {processes} processes{accumulation} = "
            f"{p.effective_batch} images per step; each process takes ceil({batches} / {processes}) = "
            f"{-(-batches // processes)} of an epoch's {batches} batches",
            *([p.alone.line()] if p.alone is not None else []),
        ]

    def _resume_lines(self) -> list[str]:
        if not self.resume_from:
            return []
        left = self.total_steps - self.resume_step
        return [f"resume          after step {self.resume_step} from {self.resume_from}; {left} steps left"]

    def _samples(self) -> str:
        if not self.samples_per_checkpoint:
            return "none"
        return f"{self.sample_summary} = {self.samples_per_checkpoint} images per saved file"

    def _validation_lines(self) -> list[str]:
        validation = self.validation
        if not validation:
            return ["validation      none (set `validation_dir` to measure a held-out loss)"]
        steps = ", ".join(str(s) for s in validation.steps)
        lines = [
            f"validation      {validation.images} held-out images in {validation.folder}, a pass at steps {steps} "
            f"(seed {validation.seed})"
        ]
        if validation.split < 1:
            held = ", ".join(p.name for p in validation.paths)
            lines.append(f"  held out of train_dir by sd-scripts' split (never trained on): {held}")
        return lines
