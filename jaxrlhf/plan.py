"""Memory planning: per-device memory of every role, phase by phase, before anything is loaded or computed.

``python -m jaxrlhf.ppo --dry_run --device_memory_gb 80 [flags]`` prints the resolved mesh (and how it lies on the
hosts), the role placement, the batch arithmetic and the table below, then stops; a configuration whose peak does
not fit is refused with the knob to turn. It needs only the models' ``config.json`` (no weights, no devices), so a
70B run on 4 nodes is planned on a laptop. The offline trainers call ``plan_supervised`` the same way.

The estimate follows what the code does (train/steps.py, models/decoder.py, sharding/tables.py), per device:

Notation: ``N`` parameter elements a device holds under the partition rules of sharding/tables.py (matrices split
over fsdp x tensor, norms replicated); ``p`` bytes per stored parameter (4: fp32 master weights of trained roles;
frozen roles keep their load dtype); ``c`` compute bytes (2 with ``--bf16``, else 4); ``b`` rows per data-parallel
rank (``--micro_train_batch_size`` / ``--micro_rollout_batch_size``); ``T`` tokens per row (prompt + response);
``D, F, H, K, E, V, L`` hidden, intermediate, heads, kv heads, head dim, vocab, layers; ``t`` the tensor size;
``layer`` / ``head`` the elements of one decoder layer / of the LM head (or embedding), before sharding.

- params       ``N * p`` (resident; 0 between uses when offloaded)
- optimizer    ``N * 8`` (AdamW first and second moments, fp32; trained roles)
- grads        ``N * 4 * 2`` (the accumulated gradient and one micro-batch's, during the role's update)
- work         ``N * c`` when ``c < p`` (the compute-dtype copy of the parameters inside a step)
               ``+ (2 * layer + head) / t * c`` (FSDP all-gathers: two layers in flight and the LM head)
               ``+ layer / t * 4`` (update only: one layer's gradient before its reduce-scatter)
- activations  per layer and token, elements ``a = 4D + (2HE + 2KE)/t + 4F/t`` (norm inputs/outputs and residual;
               q, k, v and attention output; gate, up, silu(gate), product) and bytes ``s = (H/t) * T * (4 + c)``
               (fp32 attention scores and compute-dtype probabilities, materialised by this decoder);
               update: ``L * b*T * (a*c + s)``, or with ``--gradient_checkpointing`` ``L * b*T * D*c + b*T * (a*c + s)``
               (every layer's input kept, one layer recomputed at a time); forward: ``b*T * (a*c + s)``;
               LM heads add fp32 logits ``b*T' * V/t * 4`` times 3 in an update (logits, log-softmax, gradient) and
               2 in a forward, ``T' = T`` (SFT, DPO, ...) or, in PPO, ``--logits_chunk_size`` response positions
               (the head runs chunk by chunk, train/ppo_step.py); score heads ``b*T * 4``.
- JAX sampler  (``--vllm_num_engines 0``) its own copy of the actor (``N * 4``, made by the first weight sync), and
               while generating the KV cache ``L * 2 * rows * T * K' * E * 4`` (``rows`` = prompts x samples / dp,
               ``K' = K/t`` when t divides K) plus the prefill's logits and scores
               ``rows * P * (V/t * 4 + (H/t) * T * 4)`` (``P`` = prompt length).
- LoRA         (``--lora_rank``) optimizer and grads count only the fp32 adapters (+ a score head), placed by their
               own partition rules; params add the adapters (``N_adapter * 4``); no layer gradient in flight.
               QLoRA (``--load_in_4bit``): the layers' linear kernels are NF4 codes (0.5 byte per element) and
               fp32 block-64 absmax scales, placed by their partition rules (~0.56 byte per element).
- weight sync  (vLLM pool) every tensor is all-gathered before it is sent: the largest one, fp32, on every device.
- MoE          (Mixtral, Qwen3-MoE) expert stacks ``[X, D, F']`` split over expert x fsdp x tensor; a sparse layer's
               activations per token are ``4D + attention + 4kF'/t + 2kD + X`` (``k`` of ``X`` experts of width
               ``F'``: their gate/up/silu/product, the gathered inputs and outputs, router logits); the FSDP
               all-gather of a layer keeps its experts split over ``expert``; the sync sends one expert at a time.
               The plan prints the expert and the active-per-token parameter counts.

Phases (what is on a device at once): resident = params (+ optimizer) of every role on the device that is not
offloaded (+ the sampler's copy); then ``generate`` (+ KV cache), ``experience`` (+ offloaded roles brought back, +
the largest forward working set), ``train <role>`` (+ its grads, work, activations) and ``weight sync``. The peak
must stay under ``HEADROOM`` x ``--device_memory_gb`` (GiB, 2**30 bytes: an "80GB" A100 has 80 GiB); the rest is
left for XLA's scratch space, fragmentation and the CUDA context (run GPUs with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95).
Not modelled: the start-up moment when a role is loaded before being offloaded, and XLA fusions that keep less
than listed (the estimate errs high).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional

from jaxrlhf.cli import arg
from sharding.mesh import MeshSpec, parse_mesh
from sharding.placement import plan_devices

if TYPE_CHECKING:  # the models package imports flax: loaded only when a plan is made
    from jaxrlhf.models.config import ModelConfig

GiB = 2**30
HEADROOM = 0.9


@dataclass
class PlanFlags:
    """The memory-plan flags; an entry point's config inherits them."""

    dry_run: bool = arg(False, "print the resolved mesh, role placement, batch arithmetic and per-device memory "
                               "plan, then stop (needs only config.json files; no device is used)")
    device_memory_gb: Optional[float] = arg(None, "memory per device in GiB for the plan (80 for A100-80GB); a "
                                                  "configuration whose peak exceeds 0.9 x this is refused")


# ---------------------------------------------------------------------------------------------------------------------
# Parameters per device
# ---------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _one_layer_table(model: ModelConfig, head: str,
                     sparse: bool = False) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]:
    """(non-layer entries, layer-0 entries) of the Decoder's parameter tree, as (path, shape), from a 1-layer twin.

    Every layer of the Llama family has the same parameter shapes, so one layer (``nnx.eval_shape``: nothing is
    allocated) stands for all ``L``; an MoE model has two kinds of layer, ``sparse`` (router + experts) or dense.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrlhf.models.decoder import Decoder
    from sharding.rules import path_str

    one = dataclasses.replace(model, num_layers=1, sliding_windows=model.sliding_windows[:1],
                              moe_layers=(sparse,) if model.moe_layers else ())
    abstract = nnx.split(nnx.eval_shape(lambda: Decoder(one, head=head, dtype=jnp.float32, rngs=nnx.Rngs(0))))[1]
    flat = [(path_str(k), tuple(v.shape)) for k, v in
            jax.tree_util.tree_flatten_with_path(abstract.to_pure_dict())[0]]
    return (tuple((p, s) for p, s in flat if "/layers/0/" not in p),
            tuple((p, s) for p, s in flat if "/layers/0/" in p))


@dataclass(frozen=True)
class ParamStats:
    """Element counts of one model on one mesh."""

    total: int  # all parameters
    per_device: int  # N: elements one device holds
    layer: int  # one decoder layer, unsharded
    head: int  # LM head (or the embedding it is tied to) / score head, unsharded
    largest: int  # the largest single tensor, unsharded
    adapters: int = 0  # LoRA adapter elements, all layers, unsharded
    adapters_per_device: int = 0  # ... one device holds (the adapter partition rules)
    score_per_device: int = 0  # the score head's elements one device holds (trained with LoRA too)
    linears_per_device: int = 0  # elements of the decoder layers' linear kernels one device holds
    nf4_bytes_per_device: int = 0  # ... as NF4 (QLoRA): codes [in/2, out] uint8 + absmax [in/64, out] fp32
    nf4_dq_bytes_per_device: int = 0  # ... double-quantized: absmax int8 + [in/64, ceil(out/256)] fp32 + an offset
    experts: int = 0  # mixture of experts: routed expert elements, all experts of all sparse layers, unsharded
    experts_per_device: int = 0  # ... one device holds (split over expert x fsdp x tensor)
    active: int = 0  # elements one token's forward uses (all but the experts it is not routed to)
    layer_gathered: int = 0  # one layer after its FSDP all-gather, x tensor (experts stay split over `expert`)


def param_stats(model: ModelConfig, head: str, mesh: MeshSpec, *, what: str = "--mesh", lora_rank: int = 0,
                lora_targets: tuple[str, ...] = ()) -> ParamStats:
    """Counts from the real parameter tree and partition rules; an indivisible dimension is a ValueError naming it.

    With ``lora_rank`` > 0: the adapters ``lora_a [in, r]``, ``lora_b [r, out]`` of every targeted kernel of a layer
    (models/lora.py), placed by their own partition rules."""
    from sharding.rules import partition_specs
    from sharding.tables import RULES_BY_MODEL_TYPE

    rules = RULES_BY_MODEL_TYPE[model.model_type]
    axes = SimpleNamespace(shape={"data": mesh.data, "fsdp": mesh.fsdp, "expert": mesh.expert, "tensor": mesh.tensor})
    n_sparse = sum(model.moe_layers)
    kinds = [(n, _one_layer_table(model, head, sparse)[1]) for n, sparse in
             ((model.num_layers - n_sparse, False), (n_sparse, True)) if n]
    outer = _one_layer_table(model, head, bool(n_sparse) and n_sparse == model.num_layers)[0]
    layer = max((entries for _, entries in kinds), key=lambda e: sum(math.prod(s) for _, s in e))

    def per_device(entries) -> int:
        tree = {p: SimpleNamespace(shape=s) for p, s in entries}
        try:
            specs = partition_specs(tree, rules, mesh=axes)
        except ValueError as e:
            raise ValueError(f"{what} {mesh}: {e}") from None
        n = 0
        for p, s in entries:
            spec = tuple(specs[p]) + (None,) * (len(s) - len(specs[p]))
            n += math.prod(d // _axis_size(a, axes.shape) for d, a in zip(s, spec))
        return n

    size = lambda entries: sum(math.prod(s) for _, s in entries)  # noqa: E731
    layers = lambda fn: sum(n * fn(entries) for n, entries in kinds)  # noqa: E731  summed over the layer kinds
    is_expert = lambda p: "/mlp/experts/" in p  # noqa: E731
    experts = layers(lambda e: size([x for x in e if is_expert(x[0])]))
    gathered = max(size([x for x in e if not is_expert(x[0])]) + size([x for x in e if is_expert(x[0])]) // mesh.expert
                   for _, e in kinds)
    heads = [s for p, s in outer if p in ("lm_head/kernel", "score/kernel")]
    if head == "lm" and model.tie_word_embeddings:
        heads = [s for p, s in outer if p.endswith("embed_tokens/embedding")]
    def adapters(entries):
        return [] if not lora_rank else [
            entry for p, s in entries if p.endswith("/kernel") and p.split("/")[-2] in lora_targets
            for entry in ((p[:-len("kernel")] + "lora_a", (s[0], lora_rank)),
                          (p[:-len("kernel")] + "lora_b", (lora_rank, s[1])))]

    linears = lambda entries: [(p, s) for p, s in entries if p.endswith("_proj/kernel")]  # noqa: E731
    nf4_codes = lambda e: [(p + "_nf4", (s[0] // 2, s[1])) for p, s in linears(e)]  # noqa: E731  models/nf4.py
    nf4_scales = lambda e: [(p + "_absmax", (max(1, s[0] // 64), s[1])) for p, s in linears(e)]  # noqa: E731
    total = size(outer) + layers(size)
    largest = max(math.prod(s) for _, s in outer + tuple(x for _, e in kinds for x in e))
    if experts:  # a stacked [E, ...] parameter is synced and exported one expert at a time
        largest = max([math.prod(s) for p, s in outer + tuple(x for _, e in kinds for x in e) if not is_expert(p)]
                      + [math.prod(s[1:]) for _, e in kinds for p, s in e if is_expert(p)])
    k_over_e = model.num_experts_per_tok / model.num_experts if experts else 0.0
    return ParamStats(total=total, per_device=per_device(outer) + layers(per_device),
                      layer=size(layer), head=math.prod(heads[0]) if heads else 0, largest=largest,
                      adapters=layers(lambda e: size(adapters(e))),
                      adapters_per_device=layers(lambda e: per_device(adapters(e)) if adapters(e) else 0),
                      score_per_device=per_device([(p, s) for p, s in outer if p == "score/kernel"]),
                      linears_per_device=layers(lambda e: per_device(linears(e))),
                      nf4_bytes_per_device=layers(lambda e: per_device(nf4_codes(e)) + 4 * per_device(nf4_scales(e))),
                      nf4_dq_bytes_per_device=layers(lambda e: per_device(nf4_codes(e)) + per_device(nf4_scales(e)) + sum(
                          4 * (max(1, s[0] // 64) * -(-s[1] // 256) + 1) for _, s in linears(e))),  # 2nd level replicated
                      experts=experts, experts_per_device=layers(lambda e: per_device([x for x in e if is_expert(x[0])])),
                      active=total - experts + round(experts * k_over_e), layer_gathered=gathered)


def _axis_size(axes, sizes: dict) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(sizes[a] for a in names)


# ---------------------------------------------------------------------------------------------------------------------
# Roles and the estimate
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    """One model in the run and how it is placed and used."""

    name: str
    model: ModelConfig
    head: str  # "lm" or "score"
    mesh: MeshSpec
    first: int = 0  # first local device of its mesh on every host
    trained: bool = False
    param_bytes: int = 4
    compute_bytes: int = 4
    offload: bool = False
    remat: bool = False
    train_rows: int = 0  # b of an update (rows per data-parallel rank)
    forward_rows: int = 0  # b of an experience forward
    seq_len: int = 0  # T
    mesh_flag: str = "--mesh"
    logit_positions: int = 0  # positions whose fp32 logits exist at once (0: all T; PPO: one chunk of the response)
    lora_rank: int = 0  # > 0: only LoRA adapters (+ a score head) are trained; the base is frozen
    lora_targets: tuple[str, ...] = ()
    load_in_4bit: bool = False  # QLoRA: the layers' linear kernels stored as NF4 codes + block scales
    double_quant: bool = False  # ... with the block scales double-quantized (models/nf4.py)


@dataclass(frozen=True)
class RoleMemory:
    role: Role
    stats: ParamStats
    params: int
    optimizer: int
    grads: int
    work_train: int
    work_forward: int
    act_train: int
    act_forward: int

    @property
    def resident(self) -> int:
        return 0 if self.role.offload else self.params + self.optimizer


def _activations(m: ModelConfig, t: int, rows: int, seq: int, c: int, head: str, *, train: bool,
                 remat: bool, logit_positions: int = 0) -> int:
    D, F, H, K, E, V, L = (m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads, m.head_dim,
                           m.vocab_size, m.num_layers)
    a = 4 * D + (2 * H * E + 2 * K * E) // t + 4 * F // t  # elements per layer and token
    if m.is_moe:  # a sparse layer: k experts' gate/up/silu/product + the k gathered inputs and outputs + router
        k = m.num_experts_per_tok
        a = max(a if not all(m.moe_layers) else 0,
                4 * D + (2 * H * E + 2 * K * E) // t + 4 * k * m.moe_intermediate_size // t + 2 * k * D
                + m.num_experts)
    s = (H // t) * seq * (4 + c)  # bytes of attention scores + probabilities per layer and token
    tokens = rows * seq
    if not train:
        layers = tokens * (a * c + s)
    elif remat:
        layers = L * tokens * D * c + tokens * (a * c + s)
    else:
        layers = L * tokens * (a * c + s)
    logits = rows * (logit_positions or seq) * (V // t) * 4 * (3 if train else 2) if head == "lm" else tokens * 4
    return layers + logits


def role_memory(role: Role) -> RoleMemory:
    st = param_stats(role.model, role.head, role.mesh, what=role.mesh_flag, lora_rank=role.lora_rank,
                     lora_targets=role.lora_targets)
    t, c, p = role.mesh.tensor, role.compute_bytes, role.param_bytes
    N = st.per_device
    cast = N * c if c < p else 0
    stored = N * p
    if role.load_in_4bit:  # NF4 kernels: codes + block scales, dequantized one layer at a time (in "gathered")
        stored = (N - st.linears_per_device) * p + (st.nf4_dq_bytes_per_device if role.double_quant else
                                                    st.nf4_bytes_per_device)
        cast = (N - st.linears_per_device) * c if c < p else 0
    gathered = (2 * st.layer_gathered + st.head) // t * c
    # LoRA: optimizer state and gradients for the adapters (fp32) and a score head only; no layer gradient in flight
    trained_n = st.adapters_per_device + st.score_per_device if role.lora_rank else N
    layer_grad = 0 if role.lora_rank else st.layer_gathered // t * 4
    return RoleMemory(
        role=role, stats=st, params=stored + st.adapters_per_device * 4, optimizer=trained_n * 8 if role.trained else 0,
        grads=trained_n * 4 * 2 if role.trained else 0,
        work_train=(cast + gathered + layer_grad) if role.trained else 0,
        work_forward=cast + gathered,
        act_train=_activations(role.model, t, role.train_rows, role.seq_len, c, role.head, train=True,
                               logit_positions=role.logit_positions,
                               remat=role.remat) if role.trained else 0,
        act_forward=_activations(role.model, t, role.forward_rows, role.seq_len, c, role.head, train=False,
                                 logit_positions=role.logit_positions,
                                 remat=False) if role.forward_rows else 0,
    )


@dataclass(frozen=True)
class SamplerSpec:
    """The in-process JAX sampler: a copy of the actor's parameters and a KV cache over ``rows`` samples."""

    rows: int  # prompts x samples per step (all generated at once)
    prompt_len: int
    seq_len: int


@dataclass
class Plan:
    """Per-role memory and per-phase peaks on every group of devices that holds the same roles."""

    roles: list[RoleMemory]
    processes: int
    per_host: int  # devices each host contributes
    budget: Optional[int]  # bytes per device the peak may use (None: unknown)
    device_memory_gb: Optional[float]
    sampler: Optional[SamplerSpec] = None
    vllm_sync: bool = False
    groups: list[dict] = field(default_factory=list)  # {"slots": (a, b), "roles": [...], "phases": {name: bytes}}
    lines: list[str] = field(default_factory=list)  # mesh / placement / batch lines printed above the table

    @property
    def peak(self) -> tuple[int, str, tuple[int, int]]:
        """(bytes, phase, device slots) of the highest phase on any device."""
        return max(((b, ph, g["slots"]) for g in self.groups for ph, b in g["phases"].items()), key=lambda x: x[0])

    def fits(self) -> Optional[bool]:
        return None if self.budget is None else self.peak[0] <= self.budget


def build_plan(roles: list[Role], *, processes: int, per_host: int, device_memory_gb: Optional[float],
               sampler: Optional[SamplerSpec] = None, vllm_sync: bool = False,
               lines: Optional[list[str]] = None) -> Plan:
    """Estimate every role and every phase on every group of local device slots (see the module docstring)."""
    mems = [role_memory(r) for r in roles]
    budget = int(device_memory_gb * GiB * HEADROOM) if device_memory_gb else None
    plan = Plan(mems, processes, per_host, budget, device_memory_gb, sampler, vllm_sync, lines=list(lines or []))
    by_name = {m.role.name: m for m in mems}
    actor = by_name.get("actor")

    def slots(r: Role) -> range:
        return range(r.first, r.first + r.mesh.size // processes)

    signature = [tuple(m.role.name for m in mems if s in slots(m.role)) for s in range(per_host)]
    start = 0
    for s in range(1, per_host + 1):
        if s == per_host or signature[s] != signature[start]:
            here = [by_name[n] for n in signature[start]]
            plan.groups.append({"slots": (start, s - 1), "roles": [m.role.name for m in here],
                                "phases": _phases(here, sampler if actor in here else None, vllm_sync)})
            start = s
    return plan


def _phases(here: list[RoleMemory], sampler: Optional[SamplerSpec], vllm_sync: bool) -> dict[str, int]:
    resident = sum(m.resident for m in here)
    out: dict[str, int] = {}
    actor = next((m for m in here if m.role.name == "actor"), None)
    if sampler is not None and actor is not None:
        resident += actor.stats.per_device * 4  # the sampler's own copy of the actor
        out["generate"] = resident + sampler_cache(actor, sampler)
    forwards = [m for m in here if m.role.forward_rows]
    if forwards:
        onloaded = sum(m.params for m in here if m.role.offload)
        out["experience"] = resident + onloaded + max(m.work_forward + m.act_forward for m in forwards)
    for m in here:
        if m.role.trained:
            out[f"train {m.role.name}"] = resident + m.grads + m.work_train + m.act_train
    if vllm_sync and actor is not None:
        out["weight sync"] = resident + actor.stats.largest * 4
    return out


def sampler_cache(actor: RoleMemory, s: SamplerSpec) -> int:
    """KV cache + prefill logits and scores of the JAX sampler per device (module docstring)."""
    m, mesh = actor.role.model, actor.role.mesh
    t, dp = mesh.tensor, mesh.batch_ways
    rows = -(-s.rows // dp)
    k = m.num_kv_heads // t if m.num_kv_heads % t == 0 else m.num_kv_heads
    kv = m.num_layers * 2 * rows * s.seq_len * k * m.head_dim * 4
    prefill = rows * s.prompt_len * ((m.vocab_size // t) * 4 + (m.num_heads // t) * s.seq_len * 4)
    return kv + prefill


# ---------------------------------------------------------------------------------------------------------------------
# Printing and refusing
# ---------------------------------------------------------------------------------------------------------------------


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan(plan: Plan) -> str:
    out = list(plan.lines)
    for m in plan.roles:
        st, mesh = m.stats, m.role.mesh
        if st.experts:
            out.append(f"{m.role.name}: mixture of experts, {st.total:,} parameters = {st.experts:,} in experts + "
                       f"{st.total - st.experts:,} others; {st.active:,} active per token "
                       f"({m.role.model.num_experts_per_tok} of {m.role.model.num_experts} experts); experts split "
                       f"{mesh.expert * mesh.fsdp * mesh.tensor} ways (expert {mesh.expert} x fsdp {mesh.fsdp} x "
                       f"tensor {mesh.tensor}): {st.experts_per_device:,} expert parameters per device")
    out.append("")
    out.append("memory per device (GiB):")
    out.append(f"  {'role':<8} {'mesh':<10} {'devices':<9} {'dtype':<6} {'params':>8} {'grads':>8} {'optim':>8} "
               f"{'work':>8} {'activ':>8}  notes")
    for m in plan.roles:
        r = m.role
        dtype = {4: "fp32", 2: "bf16"}.get(r.param_bytes, f"{r.param_bytes}B")
        notes = []
        if r.trained:
            notes.append(f"train b={r.train_rows} T={r.seq_len}" + (" remat" if r.remat else ""))
        if r.forward_rows:
            notes.append(f"forward b={r.forward_rows}")
        if r.offload:
            notes.append("offloaded to host between uses")
        act = m.act_train if r.trained else m.act_forward
        work = m.work_train if r.trained else m.work_forward
        out.append(f"  {r.name:<8} {str(r.mesh):<10} {_slots_str(r, plan.processes):<9} {dtype:<6} "
                   f"{gib(m.params):>8} {gib(m.grads):>8} {gib(m.optimizer):>8} {gib(work):>8} {gib(act):>8}  "
                   + ", ".join(notes))
    actor = next((m for m in plan.roles if m.role.name == "actor"), None)
    if plan.sampler is not None and actor is not None:
        out.append(f"  {'sampler':<8} {str(actor.role.mesh):<10} {_slots_str(actor.role, plan.processes):<9} "
                   f"{'fp32':<6} {gib(actor.stats.per_device * 4):>8} {'-':>8} {'-':>8} {'-':>8} "
                   f"{gib(sampler_cache(actor, plan.sampler)):>8}  JAX sampler: actor copy + KV cache "
                   f"({plan.sampler.rows} rows x {plan.sampler.seq_len} tokens)")
    out.append("")
    budget = f"budget {gib(plan.budget)} GiB ({plan.device_memory_gb:g} GiB x {HEADROOM})" if plan.budget else \
        "no budget: pass --device_memory_gb to check the fit"
    out.append(f"peak per device by phase ({budget}):")
    peak = plan.peak
    for g in plan.groups:
        a, b = g["slots"]
        out.append(f"  devices {a}-{b} of each host ({', '.join(g['roles'])}):")
        for ph, n in g["phases"].items():
            mark = ""
            if plan.budget is not None and n > plan.budget:
                mark = "  DOES NOT FIT"
            if (n, ph, g["slots"]) == peak:
                mark += "  <- peak"
            out.append(f"    {ph:<14} {gib(n):>8}{mark}")
    fits = plan.fits()
    if fits is not None:
        out.append(f"verdict: {'fits' if fits else 'does NOT fit'} (peak {gib(peak[0])} of {gib(plan.budget)} GiB "
                   f"in '{peak[1]}')")
    return "\n".join(out)


def _slots_str(r: Role, processes: int) -> str:
    n = r.mesh.size // processes
    return f"{r.first}-{r.first + n - 1}"


def check_fits(plan: Plan, knobs: dict[str, str]) -> None:
    """Raise ValueError when the peak exceeds the budget, naming the phase, the biggest parts and the knob."""
    if plan.budget is None or plan.fits():
        return
    n, phase, slots = plan.peak
    group = next(g for g in plan.groups if g["slots"] == slots)
    here = [m for m in plan.roles if m.role.name in group["roles"]]
    parts: dict[str, int] = {}
    for m in here:
        if not m.role.offload:
            parts[f"{m.role.name} params"] = m.params
            parts[f"{m.role.name} optimizer"] = m.optimizer
    role = next((m for m in here if phase == f"train {m.role.name}"), None)
    if role is not None:
        parts[f"{role.role.name} grads"] = role.grads
        parts[f"{role.role.name} activations"] = role.act_train
        parts[f"{role.role.name} work"] = role.work_train
    if phase == "generate":
        actor = next(m for m in here if m.role.name == "actor")
        parts["sampler KV cache"] = sampler_cache(actor, plan.sampler)
        parts["sampler copy"] = actor.stats.per_device * 4
    if phase == "experience":
        fw = max((m for m in here if m.role.forward_rows), key=lambda m: m.work_forward + m.act_forward)
        parts[f"{fw.role.name} forward activations"] = fw.act_forward
        parts["offloaded roles brought back"] = sum(m.params for m in here if m.role.offload)
    top = sorted(parts.items(), key=lambda kv: -kv[1])
    biggest = top[0][0]
    knob = _knob(biggest, phase, here, knobs)
    a, b = slots
    raise ValueError(
        f"the plan does not fit: '{phase}' needs {gib(n)} GiB per device on devices {a}-{b} of each host, the budget "
        f"is {gib(plan.budget)} GiB ({plan.device_memory_gb:g} GiB x {HEADROOM}); largest parts: "
        + ", ".join(f"{k} {gib(v)}" for k, v in top[:3]) + f". Turn this knob: {knob}")


def _knob(biggest: str, phase: str, here: list[RoleMemory], knobs: dict[str, str]) -> str:
    name = biggest.split(" ")[0]
    m = next((x for x in here if x.role.name == name), None)
    if biggest.endswith("activations") and phase.startswith("train") and m is not None:
        if not m.role.remat:
            return knobs.get("remat", "--gradient_checkpointing")
        if m.role.train_rows > 1:
            return f"lower {knobs.get('train_rows', '--micro_train_batch_size')} (now {m.role.train_rows})"
        return f"shorter sequences ({knobs.get('seq', '--max_len')}) or a larger tensor axis in {m.role.mesh_flag}"
    if biggest.endswith("forward activations"):
        return f"lower {knobs.get('forward_rows', '--micro_rollout_batch_size')}"
    if biggest.startswith("sampler"):
        return knobs.get("sampler", "generate elsewhere (--vllm_num_engines)")
    if biggest == "offloaded roles brought back":
        return "put the reference / reward models on their own devices (--ref_mesh / --reward_mesh SPEC@FIRST)"
    if m is not None and m.role.name in ("ref", "reward") and not m.role.offload:
        return f"--{m.role.name}_offload (keep it in host memory between uses) or --{m.role.name}_mesh SPEC@FIRST"
    flag = m.role.mesh_flag if m is not None else "--mesh"
    return (f"spread the parameters and optimizer state over more devices: a larger fsdp axis in {flag} (more hosts)"
            + (f", or {knobs['fewer_roles']}" if "fewer_roles" in knobs else ""))


# ---------------------------------------------------------------------------------------------------------------------
# Entry points' plans
# ---------------------------------------------------------------------------------------------------------------------


def _stored_bytes(path: str) -> int:
    """Bytes per parameter a checkpoint is stored in (config.json's dtype; a converted checkpoint's own record)."""
    from jaxrlhf.models.config import ModelConfig

    cfg = ModelConfig.from_dir(path).hf_config
    dtype = (cfg.get("jaxrlhf") or {}).get("dtype") or cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return 2 if str(dtype) in ("bfloat16", "float16") else 4


def _process_count(cfg) -> int:
    if getattr(cfg, "num_processes", None):
        return cfg.num_processes
    from sharding.distributed import resolve_launch

    try:
        return resolve_launch(cfg).num_processes or 1
    except ValueError:
        return 1


def _dp_words(mesh: MeshSpec) -> str:
    return "data x fsdp x expert" if mesh.expert > 1 else "data x fsdp"


def _host_lines(mesh: MeshSpec, processes: int, flag: str) -> list[str]:
    per = mesh.size // processes
    if mesh.size % processes:
        raise ValueError(f"{flag} {mesh} has {mesh.size} devices, which do not split over {processes} processes")
    if processes > 1 and (per % mesh.tensor):
        raise ValueError(f"{flag} {mesh}: the tensor axis ({mesh.tensor}) must stay inside a host ({per} devices "
                         f"per host): use a tensor size that divides {per}")
    dp = mesh.batch_ways
    expert = f" x expert {mesh.expert}" if mesh.expert > 1 else ""
    line = f"{flag} {mesh}: data {mesh.data} x fsdp {mesh.fsdp}{expert} x tensor {mesh.tensor} = {mesh.size} devices"
    if processes > 1:
        line += (f" on {processes} hosts x {per}; tensor {mesh.tensor} inside each host, {_dp_words(mesh)} = {dp} "
                 f"positions = {dp // processes} per host")
    return [line]


def plan_ppo(cfg, *, processes: Optional[int] = None) -> Plan:
    """The plan of a PPO config (jaxrlhf/ppo.py's ``PPOConfig``; read by attribute, nothing imported from it)."""
    from jaxrlhf.models.config import ModelConfig

    if cfg.pretrain is None:
        raise ValueError("--dry_run needs --pretrain (an HF model directory, or a directory holding its config.json)")
    processes = processes or _process_count(cfg)
    layout = plan_devices(cfg.mesh, {"ref": cfg.ref_mesh, "reward": cfg.reward_mesh}, processes)
    place = layout["placements"]
    main = place["main"].spec
    c = 2 if cfg.bf16 else 4
    T = cfg.prompt_max_len + cfg.generate_max_len
    dp = main.batch_ways
    samples = cfg.rollout_batch_size * cfg.n_samples_per_prompt
    lines = _host_lines(main, processes, "--mesh")
    for name in ("ref", "reward"):
        if name in place:
            lines += _host_lines(place[name].spec, processes, f"--{name}_mesh")

    actor_cfg = ModelConfig.from_dir(cfg.pretrain)
    chunk = min(cfg.logits_chunk_size, cfg.generate_max_len)  # train/ppo_step.py: the head runs chunk by chunk
    lora = _lora_of(cfg)  # LoRA on the actor and the critic (adapters-only optimizer state; NF4 base with QLoRA)
    roles = [Role("actor", actor_cfg, "lm", main, trained=True, param_bytes=4, compute_bytes=c,
                  remat=cfg.gradient_checkpointing, train_rows=cfg.micro_train_batch_size,
                  forward_rows=cfg.micro_rollout_batch_size, seq_len=T, logit_positions=chunk, **lora)]
    if lora:
        lines.append(f"LoRA r={lora['lora_rank']} on {','.join(lora['lora_targets'])} (actor and critic)"
                     f"{', NF4 base' if lora['load_in_4bit'] else ''}; the reference is the actor's base with its "
                     "adapters off (no parameters of its own)")
    from jaxrlhf.advantages import ESTIMATORS

    if ESTIMATORS[cfg.advantage_estimator].critic:
        src = cfg.critic_pretrain or (cfg.reward_pretrain.split(",")[0] if cfg.reward_pretrain else cfg.pretrain)
        roles.append(Role("critic", ModelConfig.from_dir(src), "score", main, trained=True, param_bytes=4,
                          compute_bytes=c, remat=cfg.gradient_checkpointing, train_rows=cfg.micro_train_batch_size,
                          forward_rows=cfg.micro_rollout_batch_size, seq_len=T, **lora))
    if cfg.init_kl_coef > 0 or cfg.use_kl_loss:
        p = place.get("ref", place["main"])
        roles.append(Role("ref", actor_cfg, "lm", p.spec, p.first, param_bytes=0 if lora else c, compute_bytes=c,
                          offload=cfg.ref_offload, forward_rows=cfg.micro_rollout_batch_size, seq_len=T,
                          mesh_flag="--ref_mesh" if "ref" in place else "--mesh", logit_positions=chunk))
    for i, path in enumerate(cfg.reward_pretrain.split(",") if cfg.reward_pretrain else []):
        p = place.get("reward", place["main"])
        stored = _stored_bytes(path)
        roles.append(Role("reward" if i == 0 else f"reward{i}", ModelConfig.from_dir(path), "score", p.spec,
                          p.first, param_bytes=stored, compute_bytes=min(c, stored) if cfg.bf16 else stored,
                          offload=cfg.reward_offload, forward_rows=cfg.micro_rollout_batch_size, seq_len=T,
                          mesh_flag="--reward_mesh" if "reward" in place else "--mesh"))

    updates = cfg.max_epochs * samples // max(cfg.train_batch_size, 1)
    accum = cfg.train_batch_size // max(cfg.micro_train_batch_size * dp, 1)
    lines += [
        "placement: " + "; ".join(f"{r.name} on {r.mesh_flag} {r.mesh} (devices {_slots_str(r, processes)} of each "
                                  f"host){', offloaded' if r.offload else ''}" for r in roles),
        "rollout: " + (f"vLLM pool, {cfg.vllm_num_engines} engines x {cfg.vllm_tensor_parallel_size} GPUs (outside "
                       "these meshes)" if cfg.vllm_num_engines else "in-process JAX sampler on --mesh"),
        f"batch: {cfg.rollout_batch_size} prompts x {cfg.n_samples_per_prompt} samples = {samples} samples per step; "
        f"{cfg.max_epochs} epoch(s) x {samples} / --train_batch_size {cfg.train_batch_size} = {updates} updates per "
        f"step; dp = {_dp_words(main)} = {dp}; an update = {accum} micro-batches of {cfg.micro_train_batch_size} x {dp} = "
        f"{cfg.micro_train_batch_size * dp} rows; experience forwards: "
        f"{samples // max(1, cfg.micro_rollout_batch_size * dp)} per role of {cfg.micro_rollout_batch_size} x {dp} "
        f"rows; T = {cfg.prompt_max_len} + {cfg.generate_max_len} "
        f"= {T} tokens",
    ]
    sampler = None if cfg.vllm_num_engines else SamplerSpec(samples, cfg.prompt_max_len, T)
    return build_plan(roles, processes=processes, per_host=layout["per_host"], device_memory_gb=cfg.device_memory_gb,
                      sampler=sampler, vllm_sync=bool(cfg.vllm_num_engines), lines=lines)


def _lora_of(cfg) -> dict:
    """The LoRA fields of a ``Role`` from a config's LoRA flags ({} without LoRA)."""
    if not (getattr(cfg, "lora_rank", 0) or getattr(cfg, "lora_path", None)):
        return {}
    from jaxrlhf.models.lora import parse_targets

    rank, targets = cfg.lora_rank, parse_targets(cfg.target_modules)
    if cfg.lora_path:
        from converters.peft import read_spec

        spec = read_spec(cfg.lora_path)
        rank, targets = spec.rank, spec.targets
    return dict(lora_rank=rank, lora_targets=tuple(targets), load_in_4bit=cfg.load_in_4bit,
                double_quant=cfg.bnb_4bit_use_double_quant)


PPO_KNOBS = {"remat": "--gradient_checkpointing", "train_rows": "--micro_train_batch_size",
             "forward_rows": "--micro_rollout_batch_size", "seq": "--prompt_max_len / --generate_max_len",
             "sampler": "generate on vLLM engines (--vllm_num_engines N) or lower --rollout_batch_size x "
                        "--n_samples_per_prompt / --generate_max_len",
             "fewer_roles": "drop the critic (--advantage_estimator group_norm / reinforce_baseline)"}


def dry_run_ppo(cfg, *, processes: Optional[int] = None) -> dict:
    """Print the PPO plan (process 0) and refuse one that does not fit; returns ``{"dry_run": True, "plan": Plan}``."""
    plan = plan_ppo(cfg, processes=processes)
    print(format_plan(plan), flush=True)
    check_fits(plan, PPO_KNOBS)
    return {"dry_run": True, "plan": plan}


def plan_supervised(model_path: str, mesh: str, *, micro_train_batch_size: int, max_len: int, bf16: bool,
                    gradient_checkpointing: bool, device_memory_gb: Optional[float], head: str = "lm",
                    ref_path: Optional[str] = None, ref_micro_batch_size: Optional[int] = None,
                    train_batch_size: Optional[int] = None, processes: int = 1, lora_rank: int = 0,
                    lora_targets: tuple[str, ...] = (), load_in_4bit: bool = False,
                    double_quant: bool = False) -> Plan:
    """The plan of an offline trainer (SFT, RM, DPO, KTO): one trained ``policy`` and an optional frozen ``ref``
    (DPO/KTO reference log-probs) on the same mesh. ``micro_train_batch_size`` counts rows per data-parallel rank
    (a DPO pair is 2 rows: pass 2 x the pair count). ``lora_rank`` > 0: the policy trains LoRA adapters on
    ``lora_targets`` only (a line compares its optimizer state with full fine-tuning's)."""
    from jaxrlhf.models.config import ModelConfig

    spec = parse_mesh(mesh)
    c = 2 if bf16 else 4
    lines = _host_lines(spec, processes, "--mesh")
    dp = spec.batch_ways
    if train_batch_size:
        lines.append(f"batch: --train_batch_size {train_batch_size} rows = "
                     f"{train_batch_size // max(1, micro_train_batch_size * dp)} micro-batches of "
                     f"{micro_train_batch_size} x dp {dp}; T = --max_len {max_len}")
    policy = Role("policy", ModelConfig.from_dir(model_path), head, spec, trained=True, compute_bytes=c,
                  remat=gradient_checkpointing, train_rows=micro_train_batch_size, seq_len=max_len,
                  lora_rank=lora_rank, lora_targets=tuple(lora_targets), load_in_4bit=load_in_4bit,
                  double_quant=double_quant)
    roles = [policy]
    if lora_rank:
        lora = role_memory(policy)
        full = role_memory(dataclasses.replace(policy, lora_rank=0, load_in_4bit=False, double_quant=False))
        lines.append(f"LoRA r={lora_rank} on {','.join(lora_targets)}: {lora.stats.adapters:,} adapter parameters "
                     f"({100 * lora.stats.adapters / lora.stats.total:.2f}% of {lora.stats.total:,}); optimizer state "
                     f"per device {gib(lora.optimizer)} (full fine-tuning: {gib(full.optimizer)}), gradients "
                     f"{gib(lora.grads)} (full: {gib(full.grads)})")
        if load_in_4bit:
            lines.append(f"QLoRA: NF4 base{' (double-quantized scales)' if double_quant else ''}, parameters per "
                         f"device {gib(lora.params)} (fp32 base: "
                         f"{gib(role_memory(dataclasses.replace(policy, load_in_4bit=False)).params)})")
    if ref_path:
        roles.append(Role("ref", ModelConfig.from_dir(ref_path), "lm", spec, param_bytes=c, compute_bytes=c,
                          forward_rows=ref_micro_batch_size or micro_train_batch_size, seq_len=max_len))
    return build_plan(roles, processes=processes, per_host=spec.size // processes,
                      device_memory_gb=device_memory_gb, lines=lines)


SUPERVISED_KNOBS = {"remat": "--gradient_checkpointing", "train_rows": "--micro_train_batch_size",
                    "forward_rows": "--micro_train_batch_size", "seq": "--max_len"}


def dry_run_supervised(**kwargs) -> dict:
    """``plan_supervised`` + print + refuse (the offline trainers' ``--dry_run``)."""
    plan = plan_supervised(**kwargs)
    print(format_plan(plan), flush=True)
    check_fits(plan, SUPERVISED_KNOBS)
    return {"dry_run": True, "plan": plan}


def hf_config_dir(path: str, hf: dict[str, Any]) -> str:
    """Write ``hf`` as ``path/config.json`` (a weightless model directory the plan can read); returns ``path``."""
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f".config.json.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(hf, f, indent=2)
    os.replace(tmp, os.path.join(path, "config.json"))
    return path
