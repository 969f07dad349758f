"""What a jitted function will execute, found without running it: the matmul FLOPs of its jaxpr
and XLA's memory analysis of its compiled executable.

Matmul FLOPs (`matmul_flops`): every dot_general of a closed jaxpr costs 2 x batch x contracting
x lhs-free x rhs-free elements (one multiply and one add per term), summed over the equations that
run, recursing into sub-jaxprs:

- scan: the body x its length;
- cond: the most expensive branch (an upper bound: which branch runs is data-dependent), or, with
  `branch_weights`, a weighted sum of its branches: hnet.slots names each branch of its slot
  ladder (`slots.branch_scope`), so a caller that knows which lengths a batch runs on counts
  what runs for that batch;
- while: the body once, with a note (the trip count is data-dependent);
- jit / pjit, custom_jvp_call, custom_vjp_call, checkpoint (remat) and any other primitive
  holding jaxprs: each sub-jaxpr once. A rematerialised forward appears again inside the
  backward pass, so recomputation is counted as executed.

These are the matmuls XLA is asked to do (padded chunk slots, full attention score blocks,
recomputation included); hnet.flops counts the model's useful work. Shapes are the global shapes
of the jitted program (a shard_map body would be per device: it is noted).

Memory (`memory_estimate`): `compiled.memory_analysis()` of a jax `Compiled`; the peak estimate
is arguments + outputs + temporaries - aliased (donated inputs reused as outputs).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

HNET_DIR = str(Path(__file__).resolve().parents[1])
# Primitives that call their sub-jaxprs once each, as plain function calls.
CALL_PRIMITIVES = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "checkpoint",
        "remat",
        "remat2",
        "custom_lin",
    }
)


@dataclass
class MatmulCount:
    """dot_general FLOPs of a jaxpr as executed.

    flops: total; dot_generals: equations executed (scan bodies count length times);
    by_source: FLOPs per place in hnet's code that wrote the matmul ("layers/kernels/attention.py:attend",
    forward and backward together; "other" outside hnet); backward_flops: the part inside
    transposed (backward-pass) code; float32_operand_flops: the part with a float32 (or wider)
    operand, which runs at a fraction of a bf16 matmul's rate on GPU and TPU; notes:
    approximations made (while loops, shard_map).
    """

    flops: float = 0.0
    dot_generals: int = 0
    backward_flops: float = 0.0
    float32_operand_flops: float = 0.0
    by_source: dict[str, float] = field(default_factory=dict)
    notes: set[str] = field(default_factory=set)

    def add(self, other: "MatmulCount", times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.dot_generals += int(times * other.dot_generals)
        self.backward_flops += times * other.backward_flops
        self.float32_operand_flops += times * other.float32_operand_flops
        for source, flops in other.by_source.items():
            self.by_source[source] = self.by_source.get(source, 0.0) + times * flops
        self.notes |= other.notes

    def to_dict(self) -> dict:
        return {
            "flops": self.flops,
            "dot_generals": self.dot_generals,
            "backward_flops": self.backward_flops,
            "float32_operand_flops": self.float32_operand_flops,
            "by_source": dict(sorted(self.by_source.items(), key=lambda item: -item[1])),
            "notes": sorted(self.notes),
        }


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> float:
    """2 x batch x contracting x lhs-free x rhs-free for dot_general's ((lc, rc), (lb, rb))."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    batch = math.prod(lhs_shape[d] for d in lhs_batch)
    contract = math.prod(lhs_shape[d] for d in lhs_contract)
    lhs_free = math.prod(size for d, size in enumerate(lhs_shape) if d not in lhs_contract and d not in lhs_batch)
    rhs_free = math.prod(size for d, size in enumerate(rhs_shape) if d not in rhs_contract and d not in rhs_batch)
    return 2.0 * batch * contract * lhs_free * rhs_free


def matmul_flops(closed_jaxpr, branch_weights=None) -> MatmulCount:
    """dot_general FLOPs of a ClosedJaxpr (e.g. jax.make_jaxpr(f)(*args) or jax.jit(f).trace(*args).jaxpr).

    branch_weights: None (a cond counts its most expensive branch), or a function from a cond's
    branch names (`branch_name` of each branch: the first hnet.slots branch scope inside it, or
    None) to one weight per branch (the share of the cond's executions that take it), or None to
    count that cond's most expensive branch.
    """
    return _count(_open(closed_jaxpr), backward=False, branch_weights=branch_weights)


SCOPE_PATTERN = re.compile(r"stage(\d+)_slots(\d+)")


def branch_name(jaxpr) -> str | None:
    """The first "stage{s}_slots{n}" scope (hnet.slots.branch_scope) named inside a jaxpr, or None."""
    for eqn in _open(jaxpr).eqns:
        match = SCOPE_PATTERN.search(str(eqn.source_info.name_stack))
        if match:
            return match.group(0)
        for sub in _sub_jaxprs(eqn.params):
            name = branch_name(sub)
            if name:
                return name
    return None


def _open(jaxpr):
    """A Jaxpr from a Jaxpr or a ClosedJaxpr."""
    return jaxpr.jaxpr if hasattr(jaxpr, "consts") else jaxpr


def _is_jaxpr(value) -> bool:
    return hasattr(_open(value), "eqns")


def _sub_jaxprs(params) -> list:
    """The jaxprs among an equation's parameters (directly, or in a tuple or list)."""
    found = []
    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        found.extend(_open(v) for v in values if _is_jaxpr(v))
    return found


def _count(jaxpr, backward: bool, branch_weights=None) -> MatmulCount:
    """backward: the jaxpr runs inside transposed (backward-pass) code."""
    count = MatmulCount()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        inside_backward = backward or "transpose" in str(eqn.source_info.name_stack)
        if name == "dot_general":
            lhs, rhs = (var.aval for var in eqn.invars[:2])
            flops = dot_general_flops(lhs.shape, rhs.shape, eqn.params["dimension_numbers"])
            wide = max(lhs.dtype.itemsize, rhs.dtype.itemsize) >= 4
            count.add(
                MatmulCount(
                    flops=flops,
                    dot_generals=1,
                    by_source={_source(eqn): flops},
                    backward_flops=flops if inside_backward else 0.0,
                    float32_operand_flops=flops if wide else 0.0,
                )
            )
        elif name == "scan":
            count.add(_count(_open(eqn.params["jaxpr"]), inside_backward, branch_weights), times=eqn.params["length"])
        elif name == "cond":
            branches = [_count(_open(branch), inside_backward, branch_weights) for branch in eqn.params["branches"]]
            weights = (
                None if branch_weights is None else branch_weights([branch_name(b) for b in eqn.params["branches"]])
            )
            if weights is None:
                count.add(max(branches, key=lambda branch: branch.flops))
            else:
                for branch, weight in zip(branches, weights):
                    count.add(branch, times=weight)
        elif name == "while":
            body = _count(_open(eqn.params["body_jaxpr"]), inside_backward, branch_weights)
            if body.flops:
                count.notes.add("a while loop's body is counted once (its trip count is data-dependent)")
            count.add(body)
            count.add(_count(_open(eqn.params["cond_jaxpr"]), inside_backward, branch_weights))
        else:
            for sub in _sub_jaxprs(eqn.params):
                sub_count = _count(sub, inside_backward, branch_weights)
                if sub_count.flops and name not in CALL_PRIMITIVES:
                    count.notes.add(
                        f"{name}: its sub-jaxprs are counted once each"
                        + (" at per-device shapes" if name == "shard_map" else "")
                    )
                count.add(sub_count)
    return count


def _source(eqn) -> str:
    """ "layers/kernels/attention.py:attend": the innermost frame in hnet's code that made the equation."""
    traceback = getattr(eqn.source_info, "traceback", None)
    for frame in getattr(traceback, "frames", None) or ():
        if frame.file_name.startswith(HNET_DIR) and not frame.file_name.endswith("xla_stats.py"):
            if frame.file_name.endswith("slots.py"):  # the custom VJP keeps no deeper frame
                return SLOT_STACKS
            return f"{Path(frame.file_name).relative_to(HNET_DIR)}:{frame.function_name}"
    return "other"


# What the matmuls of the inner stacks on the slot ladder are attributed to: they are traced
# through hnet.slots' custom VJP, which keeps the call site's frames, not the layers'.
SLOT_STACKS = "slots.py:inner stacks on the slot ladder"


# --------------------------------------------------------------------------------------------
# Memory of a compiled executable
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """XLA's memory analysis of one executable, in bytes (device memory, one device)."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated argument buffers
    temp_bytes: int  # activations and other intermediates

    @property
    def peak_bytes(self) -> int:
        """arguments + outputs + temporaries - aliased: the most the step holds at once."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def to_dict(self) -> dict:
        return {
            "argument_bytes": self.argument_bytes,
            "output_bytes": self.output_bytes,
            "alias_bytes": self.alias_bytes,
            "temp_bytes": self.temp_bytes,
            "peak_bytes": self.peak_bytes,
        }


def memory_estimate(compiled) -> MemoryEstimate:
    """The memory analysis of a jax Compiled (jax.jit(f).lower(*args).compile())."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend gives no memory analysis for compiled programs")
    return MemoryEstimate(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
    )
