"""Teacher kinds: which network scores y under the hindsight context x⊕o.

    teacher = build_teacher("ema", model, ema_rate=0.05, sync_interval=1, compute_dtype=torch.bfloat16)
    out = sdpo_loss(model, student_batch, teacher_batch, loss_mode=..., teacher=teacher)
    ... optimizer.step()
    teacher.update()                           # after every optimizer step (only the EMA teacher changes)

Kinds (names as TRL's ``teacher_model_kind``, plus the sister paper's trust region):
  * ``live`` — the current network itself, recomputed at every step (the paper's choice; the default).
  * ``ema`` — an exponential moving average of the student: θ_T ← (1 − rate)·θ_T + rate·θ_S every
    ``sync_interval`` optimizer steps, starting from θ_T = θ_S. With LoRA the average is a second adapter on the
    same base weights (only adapter-sized memory); without LoRA it is a copy of every weight in the compute dtype.
  * ``base`` — the frozen initial network: the LoRA adapter switched off, or a copy in the compute dtype.
  * ``trust_region`` — lasgroup/SDPO's trust-region teacher: logits (1 − mix)·z_base + mix·z_current, i.e.
    π_T ∝ π_base^(1−mix)·π_current^mix, both under x⊕o; ``mix`` = 0 is ``base``, 1 is ``live``. Costs a second
    teacher forward per step.

Every teacher scores under ``torch.no_grad`` through ``scoring(model)``, a context that yields the network to run
and an optional ``LogitBlend``; ``state_dict``/``load_state_dict`` carry what a checkpoint must keep (the EMA
weights and the step they were last synchronised at); ``base`` and ``trust_region`` keep nothing, since the initial
weights are the base model's (or the adapter switched off).
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from sdpo.core import LogitBlend

logger = logging.getLogger(__name__)

TEACHER_KINDS = ("live", "ema", "base", "trust_region")
# Other spellings people bring from the anchors: lasgroup/SDPO's ``teacher_regularization: trust-region``.
TEACHER_KIND_ALIASES = {"trust-region": "trust_region", "trustregion": "trust_region", "current": "live"}
TEACHER_ADAPTER = "sdpo_ema_teacher"
TEACHER_STATE_FILE = "teacher_state.pt"


def resolve_teacher_kind(name: str) -> str:
    """The canonical teacher kind for ``name`` (aliases accepted); a clear error for anything else."""
    kind = TEACHER_KIND_ALIASES.get(str(name).lower(), str(name).lower())
    if kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher {name!r}: use one of {list(TEACHER_KINDS)}")
    return kind


def is_lora_model(model) -> bool:
    """True for a peft model whose every trainable parameter belongs to a LoRA adapter."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    if not isinstance(model, PeftModel):
        return False
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return bool(trainable) and all("lora_" in name for name in trainable)


def unwrap(model):
    """The module inside a DistributedDataParallel (or accelerate) wrapper."""
    return getattr(model, "module", model)


def frozen_copy(model, dtype: torch.dtype):
    """A no-grad, eval-mode copy of ``model`` with every floating-point parameter in ``dtype``.

    Each parameter is cast on its own (no intermediate full-precision duplicate); buffers (rotary frequencies)
    are copied as they are, as ``from_pretrained(dtype=...)`` keeps them.
    """
    memo = {
        id(p): torch.nn.Parameter(
            p.detach().to(dtype if p.is_floating_point() else p.dtype, copy=True), requires_grad=False
        )
        for p in model.parameters()
    }
    twin = copy.deepcopy(model, memo)
    twin.eval()
    return twin


# Under FSDP2 (sdpo.learner.fsdp) the student's parameters, and an EMA adapter on the same model, are DTensor shards
# while a frozen copy stays whole: these two give a tensor in the other's form.
def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a DTensor shard (a collective: every process calls it), else ``tensor``."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _like(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``source`` in ``target``'s form: gathered when only the source is sharded, this process's shard of a whole
    source (every process holds it) when only the target is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor) and not isinstance(source, DTensor):
        return distribute_tensor(source, target.device_mesh, target.placements, src_data_rank=None)
    return source if isinstance(target, DTensor) else _whole(source)


class Teacher:
    """The live teacher: the student network itself. Base class of the other kinds."""

    kind = "live"

    def __init__(self):
        self.optimizer_steps = 0
        self.last_sync_step = 0

    @contextmanager
    def scoring(self, model):
        """Yields (network to run, ``LogitBlend`` or None) for one no-grad teacher scoring."""
        yield model, None

    def update(self) -> bool:
        """Called after every optimizer step; True when the teacher changed."""
        self.optimizer_steps += 1
        return self._sync()

    def _sync(self) -> bool:
        return False

    def state_dict(self) -> dict:
        return {"kind": self.kind, "optimizer_steps": self.optimizer_steps, "last_sync_step": self.last_sync_step}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("kind", "live")
        if saved != self.kind:
            raise ValueError(
                f"the checkpoint's teacher is {saved!r} but this run asks for {self.kind!r}; "
                f"resume with teacher={saved}"
            )
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        self.last_sync_step = int(state.get("last_sync_step", 0))

    def extra_parameters(self) -> int:
        """Parameters this teacher holds beyond the student's (for the memory comparison)."""
        return 0

    def reset(self) -> None:
        """Start over from the current student (a state with nothing saved: a new user, an old checkpoint)."""
        self.optimizer_steps = self.last_sync_step = 0


class BaseTeacher(Teacher):
    """The frozen initial network: a LoRA model with its adapter off, or ``reference`` (a frozen copy)."""

    kind = "base"

    def __init__(self, model, reference=None):
        super().__init__()
        self.model = unwrap(model)
        self.reference = reference
        if reference is None and not is_lora_model(self.model):
            raise ValueError("a base teacher without LoRA needs a frozen copy of the initial weights")

    def reference_context(self):
        """Context under which ``self.reference_network`` computes the initial network's outputs."""
        return self.model.disable_adapter() if self.reference is None else torch.no_grad()

    @property
    def reference_network(self):
        return self.model if self.reference is None else self.reference

    @contextmanager
    def scoring(self, model):
        with self.reference_context():
            yield self.reference_network, None

    def extra_parameters(self) -> int:
        return 0 if self.reference is None else sum(p.numel() for p in self.reference.parameters())


class TrustRegionTeacher(BaseTeacher):
    """Logits (1 − mix)·z_base + mix·z_current under x⊕o (lasgroup/SDPO's ``teacher_regularization: trust-region``)."""

    kind = "trust_region"

    def __init__(self, model, mix: float, reference=None):
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"trust_region_mix must be in [0, 1], got {mix}")
        super().__init__(model, reference)
        self.mix = mix

    @contextmanager
    def scoring(self, model):
        yield model, LogitBlend(self.reference_network, self.mix, self.reference_context)


class EMATeacher(Teacher):
    """θ_T ← (1 − rate)·θ_T + rate·θ_S every ``sync_interval`` optimizer steps, from θ_T = θ_S.

    Subclasses name the (student parameter, teacher parameter) pairs in ``names`` of ``student_module`` and
    ``teacher_module``; ``pairs`` looks them up at every use, since a checkpoint load may replace parameter objects
    (a Trainer resuming a LoRA adapter does). The update is computed in fp32 and stored in the teacher's dtype.
    """

    kind = "ema"

    def __init__(self, rate: float, sync_interval: int):
        super().__init__()
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"teacher_ema_rate must be in (0, 1], got {rate}")
        if sync_interval < 1:
            raise ValueError(f"teacher_sync_interval must be >= 1, got {sync_interval}")
        self.rate = rate
        self.sync_interval = sync_interval
        self.names: list[tuple[str, str]] = []
        self.student_module = self.teacher_module = None

    @property
    def pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(student parameter name, student tensor, teacher tensor) for every averaged parameter."""
        student, teacher = dict(self.student_module.named_parameters()), dict(self.teacher_module.named_parameters())
        return [(name, student[name], teacher[teacher_name]) for name, teacher_name in self.names]

    @torch.no_grad()
    def _sync(self) -> bool:
        if self.optimizer_steps % self.sync_interval:
            return False
        for _, student, teacher in self.pairs:
            teacher.copy_(teacher.float().lerp_(_like(student.detach(), teacher).float(), self.rate))
        self.last_sync_step = self.optimizer_steps
        return True

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "rate": self.rate,
            "sync_interval": self.sync_interval,
            "weights": {name: _whole(teacher.detach()).cpu().clone() for name, _, teacher in self.pairs},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        weights = state["weights"]
        names = {name for name, _, _ in self.pairs}
        if set(weights) != names:
            raise ValueError(
                f"the checkpoint's EMA teacher holds {len(weights)} tensors that do not match this model's "
                f"{len(names)} (a different model or LoRA setting?)"
            )
        for name, _, teacher in self.pairs:
            teacher.copy_(_like(weights[name].to(teacher.device), teacher))

    def extra_parameters(self) -> int:
        return sum(teacher.numel() for _, _, teacher in self.pairs)

    @torch.no_grad()
    def reset(self) -> None:
        super().reset()
        for _, student, teacher in self.pairs:
            teacher.copy_(_like(student, teacher))


class AdapterEMATeacher(EMATeacher):
    """EMA of a LoRA student kept as a second adapter on the same (frozen) base weights."""

    def __init__(self, model, rate: float, sync_interval: int):
        super().__init__(rate, sync_interval)
        self.model = unwrap(model)
        self.student_adapter = self.model.active_adapter
        if TEACHER_ADAPTER not in self.model.peft_config:
            self.model.add_adapter(TEACHER_ADAPTER, copy.deepcopy(self.model.peft_config[self.student_adapter]))
        # add_adapter may mark the new adapter trainable; the teacher never is, and the student stays active.
        self.model.set_adapter(self.student_adapter)
        self.student_module = self.teacher_module = self.model
        student_key, teacher_key = f".{self.student_adapter}.", f".{TEACHER_ADAPTER}."
        self.names = [
            (name, name.replace(student_key, teacher_key))
            for name, _ in self.model.named_parameters()
            if student_key in name and "lora_" in name
        ]
        for _, _, teacher in self.pairs:
            teacher.requires_grad_(False)
        self.reset()
        if not self.names:
            raise ValueError("the LoRA model has no adapter weights to average for an EMA teacher")

    @contextmanager
    def scoring(self, model):
        self.model.set_adapter(TEACHER_ADAPTER, inference_mode=True)
        try:
            yield self.model, None
        finally:
            # Re-activating the student adapter restores its requires_grad (and leaves the teacher's off).
            self.model.set_adapter(self.student_adapter)


class CopyEMATeacher(EMATeacher):
    """EMA of a fully trained student kept as a frozen copy of every weight in the compute dtype.

    With a 16-bit copy an update smaller than half a unit in the last place of a weight rounds away (at rate 0.05,
    differences below ~2^-4 of a bf16 ulp); use an fp32 compute dtype or LoRA where that matters.
    """

    def __init__(self, model, rate: float, sync_interval: int, dtype: torch.dtype):
        super().__init__(rate, sync_interval)
        student = unwrap(model)
        self.network = frozen_copy(student, dtype)
        self.student_module, self.teacher_module = student, self.network
        self.names = [(name, name) for name, parameter in student.named_parameters() if parameter.is_floating_point()]

    @contextmanager
    def scoring(self, model):
        yield self.network, None


def build_teacher(
    kind: str,
    model,
    *,
    ema_rate: float = 0.05,
    sync_interval: int = 1,
    trust_region_mix: float = 0.05,
    compute_dtype: torch.dtype = torch.float32,
    initial_model=None,
) -> Teacher:
    """The teacher of ``kind`` for ``model`` (LoRA or not), built before the first update.

    ``initial_model``: for ``base``/``trust_region`` without LoRA, the initial weights to copy (default: ``model``
    as it is now, which must then be untrained — pass a freshly loaded base model when resuming).
    """
    kind = resolve_teacher_kind(kind)
    student = unwrap(model)
    lora = is_lora_model(student)
    if kind == "live":
        return Teacher()
    if kind == "ema":
        if lora:
            return AdapterEMATeacher(student, ema_rate, sync_interval)
        return CopyEMATeacher(student, ema_rate, sync_interval, compute_dtype)
    reference = None if lora else frozen_copy(unwrap(initial_model or student), compute_dtype)
    if kind == "base":
        return BaseTeacher(student, reference)
    return TrustRegionTeacher(student, trust_region_mix, reference)


def save_teacher_state(teacher: Teacher, folder, state: dict | None = None) -> None:
    """Write the teacher's checkpoint state (``state``, else ``teacher.state_dict()``) into ``folder`` (next to the
    weights)."""
    torch.save(state if state is not None else teacher.state_dict(), Path(folder) / TEACHER_STATE_FILE)


def load_teacher_state(teacher: Teacher, folder) -> bool:
    """Restore the teacher from a checkpoint ``folder``; False (with a warning for an EMA teacher, which then
    restarts from the current student) when the checkpoint predates teacher states."""
    path = Path(folder) / TEACHER_STATE_FILE
    if not path.is_file():
        if teacher.kind == "ema":
            logger.warning(
                "%s holds no %s: the EMA teacher restarts from the resumed student", folder, TEACHER_STATE_FILE
            )
        return False
    teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True


def check_sharded_training(kind: str, model, *, zero3: bool, fsdp: bool) -> None:
    """Refuse a teacher that would read sharded weights: a copy or adapter average taken from ZeRO-3 or FSDP shards
    holds empty or partial tensors (TRL #6828/#6829). The live teacher, and base/trust_region through a LoRA adapter
    switched off, need no copy and work under any sharding."""
    if not (zero3 or fsdp) or kind == "live" or (kind in ("base", "trust_region") and is_lora_model(unwrap(model))):
        return
    where = "DeepSpeed ZeRO-3" if zero3 else "FSDP"
    raise ValueError(
        f"teacher={kind} is not supported under {where}: its weights would be copied from sharded parameters; use "
        "DDP or ZeRO-1/2, or teacher=live (or base/trust_region with LoRA)"
    )


class TeacherCallback(TrainerCallback):
    """``transformers.Trainer`` callback: the teacher's update after every optimizer step, its state saved into
    every ``checkpoint-<step>`` folder (main process) and restored from it when training resumes."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    def on_step_end(self, args, state, control, **kwargs):
        self.teacher.update()

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            save_teacher_state(self.teacher, folder)

    def on_train_begin(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step > 0 and folder.is_dir():
            load_teacher_state(self.teacher, folder)
