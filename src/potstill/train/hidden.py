"""Hidden-state matching: each student decoder layer's output vs. its teacher layer's, through a projection.

    potstill train --capture runs/cap --student prune:depth:0.5 --mode online --hidden-weight 1.0

Layer mapping: a `prune:depth` student records which teacher layers it dropped, so student layer j is
teacher layer kept[j]; a student as deep as the teacher maps layer to layer; otherwise layers map
uniformly (student j -> teacher round((j+1) * Lt / Ls) - 1, as TinyBERT does). Each pair has a
learned linear projection (student width -> teacher width, no bias), initialised to the identity
(truncated when the widths differ), trained with the student. The projections live in the
training checkpoints (`hidden_projections.pt`, for --resume) and are NOT saved with the final
student: the HF model directory stays a plain model.

The term, per learned position (the same positions as the KD loss) is the mean over layer pairs
of ||P h_student - h_teacher||^2 / ||h_teacher||^2: a relative squared error, so it does not
depend on the residual stream's scale (which grows with depth) and sums over positions like the
KD term. Hidden states are taken with forward hooks on the decoder layers, so the student's
forward call in the loop is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from potstill.errors import PotstillError
from potstill.students.prune import decoder_layers

FILE = "hidden_projections.pt"


def layer_mapping(n_student: int, n_teacher: int, info: dict) -> list[int]:
    """Teacher layer index for each student layer."""
    dropped = info.get("dropped_layers")
    if dropped is not None:
        before = int(info.get("layers_before", n_teacher))
        kept = [i for i in range(before) if i not in set(dropped)]
        if len(kept) != n_student or before != n_teacher:
            raise PotstillError(
                f"hidden-state loss: the student kept {len(kept)} of {before} layers but has {n_student}, "
                f"and the teacher has {n_teacher}: it was not pruned from this teacher"
            )
        return kept
    if n_student == n_teacher:
        return list(range(n_student))
    return [max(0, round((j + 1) * n_teacher / n_student) - 1) for j in range(n_student)]


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class HiddenMatcher(nn.Module):
    """Projections + forward hooks that collect both models' hidden states at the learned positions."""

    def __init__(self, student_layers, teacher_layers, mapping: list[int], d_student: int, d_teacher: int):
        super().__init__()
        self.mapping = mapping
        self.proj = nn.ModuleList(nn.Linear(d_student, d_teacher, bias=False) for _ in mapping)
        for p in self.proj:
            nn.init.eye_(p.weight)  # identity when the widths match: a student equal to the teacher starts at 0
        self._batch = None
        self._student: dict[int, torch.Tensor] = {}
        self._teacher: dict[int, torch.Tensor] = {}
        self._handles = [layer.register_forward_hook(self._hook(self._student, j)) for j, layer in enumerate(student_layers)]
        self._handles += [
            teacher_layers[t].register_forward_hook(self._hook(self._teacher, t)) for t in sorted(set(mapping))
        ]

    @classmethod
    def build(cls, student, teacher, info: dict, device) -> HiddenMatcher:
        s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
        mapping = layer_mapping(len(s_layers), len(t_layers), info)
        matcher = cls(s_layers, t_layers, mapping, student.config.hidden_size, teacher.config.hidden_size)
        return matcher.to(device)

    def _hook(self, store: dict, idx: int):
        def fn(module, args, output):
            b = self._batch
            h = _output(output)
            # only while a training batch is in flight (not during on-policy sampling, eval, or the
            # backward recomputation of gradient checkpointing)
            if b is not None and h.shape[:2] == b.input_ids.shape:
                store[idx] = h[b.rows.to(h.device), b.cols.to(h.device)]

        return fn

    def begin(self, batch) -> None:
        """Arm the hooks for this batch (call before the teacher's and the student's forward)."""
        self._batch = batch
        self._student.clear()
        self._teacher.clear()

    def loss_sum(self, batch) -> torch.Tensor:
        """Sum over learned positions of the mean relative squared error over layer pairs (with grad)."""
        self._batch = None
        if len(self._student) != len(self.mapping) or len(self._teacher) != len(set(self.mapping)):
            raise RuntimeError("hidden-state loss: hidden states were not captured for this batch")
        total = None
        for j, t in enumerate(self.mapping):
            h_s = self.proj[j](self._student[j].float())
            h_t = self._teacher[t].float().to(h_s.device)
            rel = (h_s - h_t).pow(2).sum(-1) / h_t.pow(2).sum(-1).clamp_min(1e-6)
            total = rel if total is None else total + rel
        self._student.clear()
        self._teacher.clear()
        return (total / len(self.mapping)).sum()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def save(self, directory: Path, optimizer=None) -> None:
        tmp = Path(directory) / f".{FILE}.tmp"
        torch.save({"mapping": self.mapping, "state": self.proj.state_dict(),
                    "optimizer": optimizer.state_dict() if optimizer is not None else None}, tmp)
        tmp.replace(Path(directory) / FILE)

    def load(self, directory: Path, optimizer=None) -> bool:
        path = Path(directory) / FILE
        if not path.exists():
            return False
        state = torch.load(path, map_location=next(self.parameters()).device, weights_only=True)
        if state["mapping"] != self.mapping:
            raise PotstillError("hidden-state projections were saved for another layer mapping", where=str(path))
        self.proj.load_state_dict(state["state"])
        if optimizer is not None and state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        return True
