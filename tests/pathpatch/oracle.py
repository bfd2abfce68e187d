"""A brute-force path patching oracle that shares nothing with the engine.

It has its own hypothesis representation (plain tuples, rendered to pattern text for the
engine), its own matcher over explicit positional paths, its own forward pass in float64 from
the raw weights, and evaluates the treeified model literally: by recursion over suffixes, every
path with its own private copy of every node. Exponential, so only for tiny models.
"""

from __future__ import annotations

import math
import random
from fnmatch import fnmatchcase

import torch

# ---------------------------------------------------------------- hypotheses as plain data
# ("chain", [step...]) with step = "..." or (glob, channel|None, [restriction...])
# restriction = ("offset", k) | ("pos", (..)) | ("src", (..)) | ("mask", name)
# ("edges", keep: bool, [(sender_glob, receiver_glob, channel|None)...])
# ("or", a, b) | ("and", a, b) | ("not", a) | ("all",) | ("none",)


def render(h) -> str:
    """Pattern text for the engine."""
    kind = h[0]
    if kind == "chain":
        parts = []
        for s in h[1]:
            if s == "...":
                parts.append("...")
                continue
            glob, ch, rs = s
            text = glob + (f"[{ch}]" if ch else "")
            for r in rs:
                if r[0] == "offset":
                    text += f"@offset={r[1]}"
                elif r[0] in ("pos", "src"):
                    text += f"@{r[0]}=" + ",".join(map(str, r[1]))
                else:
                    text += f"@mask={r[1]}"
            parts.append(text)
        return " -> ".join(parts)
    if kind == "edges":
        body = ", ".join(f"{s}->{r}" + (f".{c}" if c else "") for s, r, c in h[2])
        return ("circuit(" if h[1] else "remove(") + body + ")"
    if kind == "or":
        return f"({render(h[1])} | {render(h[2])})"
    if kind == "and":
        return f"({render(h[1])} & {render(h[2])})"
    if kind == "not":
        return f"~({render(h[1])})"
    return kind


class Model:
    """Weights in float64 and the graph structure, read straight from the model's state dict."""

    def __init__(self, tl_model):
        cfg = tl_model.cfg
        self.cfg = cfg
        self.w = {k: v.detach().to(torch.float64) for k, v in tl_model.state_dict().items()}
        self.L, self.H = cfg.n_layers, cfg.n_heads
        self.mlp = not cfg.attn_only
        self.norm = cfg.normalization_type  # "LN", "RMS" or None
        assert self.norm in ("LN", "RMS", None), self.norm
        self.parallel = bool(cfg.parallel_attn_mlp)
        self.rotary = cfg.positional_embedding_type == "rotary"
        self.local = [bool(cfg.use_local_attn) and cfg.attn_types[layer] == "local"
                      for layer in range(cfg.n_layers)]  # a query sees only window_size keys
        self.group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)  # query heads per kv head
        self.act = {"gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
                    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
                    }[cfg.act_fn] if self.mlp else None
        self.post = bool(cfg.use_normalization_before_and_after or cfg.post_norm_only)  # norms after
        self.pre = not cfg.post_norm_only  # norms before attention and MLP (OLMo-2: none)
        self.rotates = [self.rotary and (cfg.rotary_layers is None or cfg.rotary_layers[layer])
                        for layer in range(cfg.n_layers)]  # SmolLM3: some layers do not rotate
        self.scale = cfg.attn_scale if cfg.use_attn_scale else 1.0
        # memos only, of pure functions of their arguments (the same tensors, bit for bit)
        self._senders: dict[str, list[str]] = {}
        self._heads: dict[tuple, torch.Tensor] = {}
        self._turns: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._constants: dict[str, torch.Tensor] = {}

    # graph, independently: which (sender, layer-rank) feeds what
    def rank(self, name: str) -> float:
        if name == "in":
            return -1
        if name == "out":
            return self.L + 1
        if name.startswith("a"):
            return int(name[1:].split(".")[0])
        return int(name[1:]) + 0.5

    def names(self) -> list[str]:
        out = ["in"]
        for layer in range(self.L):
            out += [f"a{layer}.{h}" for h in range(self.H)]
            if self.mlp:
                out.append(f"m{layer}")
        return out + ["out"]

    def senders(self, receiver: str) -> list[str]:
        if receiver not in self._senders:
            self._senders[receiver] = self._senders_of(receiver)
        return self._senders[receiver]

    def _senders_of(self, receiver: str) -> list[str]:
        r = self.rank(receiver)
        if receiver.startswith("a") or (receiver.startswith("m") and self.parallel):
            return [n for n in self.names() if n != "out" and self.rank(n) < math.floor(r)]
        return [n for n in self.names() if n != "out" and self.rank(n) < r]

    @staticmethod
    def channels(name: str) -> list[str | None]:
        if name.startswith("a"):
            return ["q", "k", "v"]
        return ["resid"] if name != "in" else []

    def pre_norm(self, x, prefix):
        """The norm in front of a sublayer, where the model has one."""
        return self.layernorm(x, prefix) if self.pre else x

    def layernorm(self, x, prefix):
        if self.norm is None:
            return x
        if self.norm == "RMS":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.cfg.eps) * self.w[f"{prefix}.w"]
        x = x - x.mean(-1, keepdim=True)
        x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.cfg.eps)
        return x * self.w[f"{prefix}.w"] + self.w[f"{prefix}.b"]

    def rotate(self, x, layer: int, p: int):
        """x [d_head] (a q or k vector) rotated by position p: pairs (i, i + n/2), or adjacent,
        turned by p * base^(-2i/n) (default rotation only), the angle's cosine and sine taken in
        float32 as transformers takes them, then applied in float64."""
        if not self.rotates[layer]:
            return x
        n = self.cfg.rotary_dim
        rot, rest = x[:n], x[n:]
        if self.cfg.rotary_adjacent_pairs:
            flip = torch.stack([-rot[1::2], rot[::2]], dim=-1).reshape(-1)
        else:
            flip = torch.cat([-rot[n // 2:], rot[:n // 2]])
        cos, sin = self.turn(layer, p)
        return torch.cat([rot * cos + flip * sin, rest])

    def turn(self, layer: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of `rotate`'s angles at position p, one per rotated dimension."""
        if (layer, p) not in self._turns:
            n = self.cfg.rotary_dim
            base = self.cfg.rotary_base
            if self.local[layer] and self.cfg.rotary_base_local is not None:  # Gemma-3's local
                base = self.cfg.rotary_base_local
            angle = p * (1.0 / base ** (torch.arange(0, n, 2).float() / n))
            if self.cfg.rotary_adjacent_pairs:
                angle = angle.repeat_interleave(2)
            else:
                angle = torch.cat([angle, angle])
            self._turns[layer, p] = angle.cos().double(), angle.sin().double()
        return self._turns[layer, p]

    def qk_norm(self, x, layer: int, channel: str, head: int, inp):
        """A head's q or k vector x through its RMS norm (Qwen3), when the model has one; a norm
        over all heads (OLMo-2) takes the RMS of the projection of the same input `inp` through
        every head (every kv head for k) and this head's slice of the weight."""
        if not self.cfg.use_qk_norm:
            return x
        w = self.w[f"blocks.{layer}.attn.{channel}_norm.w"]
        if not self.cfg.qk_norm_over_heads:
            return x / torch.sqrt((x * x).mean() + self.cfg.eps) * w
        name = "W_Q" if channel == "q" else "W_K"
        bias = "b_Q" if channel == "q" else "b_K"
        heads = range(self.H) if channel == "q" else range(0, self.H, self.group)  # one per kv head
        full = torch.cat([inp @ self.kv_weight(layer, name, h) + self.kv_weight(layer, bias, h)
                          for h in heads])
        own = head if channel == "q" else head // self.group
        dh = x.shape[-1]
        return x / torch.sqrt((full * full).mean() + self.cfg.eps) * w[own * dh:(own + 1) * dh]

    def kv_weight(self, layer: int, name: str, head: int):
        """A head's W_Q / b_Q / W_O, or the W_K / W_V / b_K / b_V of its kv head under
        grouped-query attention."""
        if (layer, name, head) not in self._heads:
            key = f"blocks.{layer}.attn.{name}"
            self._heads[layer, name, head] = (
                self.w[key][head] if key in self.w
                else self.w[f"blocks.{layer}.attn._{name}"][head // self.group])
        return self._heads[layer, name, head]

    def mlp_out(self, x, layer: int):
        w, pre = self.w, f"blocks.{layer}.mlp"
        if f"{pre}.W_gate" in w:  # TransformerLens's gated MLP: b_in after the product
            hidden = self.act(x @ w[f"{pre}.W_gate"]) * (x @ w[f"{pre}.W_in"]) + w[f"{pre}.b_in"]
        else:
            hidden = self.act(x @ w[f"{pre}.W_in"] + w[f"{pre}.b_in"])
        return hidden @ w[f"{pre}.W_out"]

    @staticmethod
    def cap(x, cap):
        """Gemma-2's soft cap, where the model has one."""
        return cap * torch.tanh(x / cap) if cap is not None and cap > 0 else x

    def constants(self, receiver: str) -> torch.Tensor:
        """Biases every run adds before `receiver` reads the residual stream (with norms after
        the sublayers, the biases sit inside those norms: `Oracle.gather`)."""
        if receiver in self._constants:  # never changed in place: callers add to a copy
            return self._constants[receiver]
        total = torch.zeros(self.cfg.d_model, dtype=torch.float64)
        if not self.post:
            for sender in self.senders(receiver):
                if sender.startswith("a") and sender.endswith(".0"):  # b_O once per layer
                    total = total + self.w[f"blocks.{sender[1:].split('.')[0]}.attn.b_O"]
                elif sender.startswith("m"):
                    total = total + self.w[f"blocks.{sender[1:]}.mlp.b_out"]
        self._constants[receiver] = total
        return total


class Oracle:
    """Literal treeified evaluation for one example."""

    def __init__(self, model: Model, hyp, xr, xc, masks):
        self.m, self.h, self.xr, self.xc, self.masks = model, hyp, xr, xc, masks
        self.T = len(xr)
        self._edge_sets: dict[int, set] = {}  # memo only, by the id of the hypothesis node
        self._inside: dict[tuple, bool] = {}  # memo only: is a path in the hypothesis's P

    # ------------------------------------------------------------ the matcher
    def restriction_holds(self, r, step) -> bool:
        _, ch, i, j = step
        if r[0] == "offset":
            return j == i - r[1]
        if r[0] == "pos":
            return i in {p % self.T for p in r[1] if -self.T <= p < self.T}
        if r[0] == "src":
            return j in {p % self.T for p in r[1] if -self.T <= p < self.T}
        mask = self.masks[r[1]]
        return bool(mask[i, j] if mask.dim() == 2 else mask[i])

    def step_matches(self, pat, step) -> bool:
        glob, ch, rs = pat
        name, channel = step[0], step[1]
        if not fnmatchcase(name, glob):
            return False
        if ch is not None and channel != ch:
            return False
        return all(self.restriction_holds(r, step) for r in rs)

    def chain_matches(self, steps, path) -> bool:
        pats = ["..."] + list(steps) + ["..."]

        def go(a: int, b: int) -> bool:
            if a == len(pats):
                return b == len(path)
            if pats[a] == "...":
                return any(go(a + 1, c) for c in range(b, len(path) + 1))
            return b < len(path) and self.step_matches(pats[a], path[b]) and go(a + 1, b + 1)

        return go(0, 0)

    def edge_set(self, keep, specs):
        all_edges = {
            (s, r, c) for r in self.m.names() for c in self.m.channels(r) for s in self.m.senders(r)
        }
        chosen = {
            (s, r, c) for (s, r, c) in all_edges for (gs, gr, gc) in specs
            if fnmatchcase(s, gs) and fnmatchcase(r, gr) and (gc is None or gc == c)
        }
        return chosen if keep else all_edges - chosen

    def contains(self, h, path) -> bool:
        if h is self.h:  # the tree's leaves and `count` ask the same question of every path
            if path not in self._inside:
                self._inside[path] = self._contains(h, path)
            return self._inside[path]
        return self._contains(h, path)

    def _contains(self, h, path) -> bool:
        kind = h[0]
        if kind == "chain":
            return self.chain_matches(h[1], path)
        if kind == "edges":
            if id(h) not in self._edge_sets:
                self._edge_sets[id(h)] = self.edge_set(h[1], h[2])
            edges = self._edge_sets[id(h)]
            return all((a[0], b[0], b[1]) in edges for a, b in zip(path, path[1:]))
        if kind == "or":
            return self.contains(h[1], path) or self.contains(h[2], path)
        if kind == "and":
            return self.contains(h[1], path) and self.contains(h[2], path)
        if kind == "not":
            return not self.contains(h[1], path)
        return kind == "all"

    # ------------------------------------------------------------ the tree
    def value(self, node: str, suffix: tuple, p: int) -> torch.Tensor:
        """What this node's private copy (on `suffix`) writes at position p (no biases)."""
        w, m = self.m.w, self.m
        if node == "in":
            path = (("in", None, p, p),) + suffix
            tok = self.xr[p] if self.contains(self.h, path) else self.xc[p]
            return w["embed.W_E"][tok] + (0 if m.rotary else w["pos_embed.W_pos"][p])

        def reads(channel, i, j):
            return self.gather(node, (node, channel, i, j), suffix, j)

        if node.startswith("m"):
            layer = int(node[1:])
            x = m.pre_norm(reads("resid", p, p), f"blocks.{layer}.ln2")
            if m.post:  # the MLP's own norm after it, its bias inside
                return m.layernorm(m.mlp_out(x, layer) + w[f"blocks.{layer}.mlp.b_out"],
                                   f"blocks.{layer}.ln2_post")
            return m.mlp_out(x, layer)
        layer, head = (int(t) for t in node[1:].split("."))
        pre = f"blocks.{layer}"
        ln = f"{pre}.ln1"
        q_in = m.pre_norm(reads("q", p, p), ln)
        q = q_in @ m.kv_weight(layer, "W_Q", head) + m.kv_weight(layer, "b_Q", head)
        q = m.rotate(m.qk_norm(q, layer, "q", head, q_in), layer, p)
        scores, values = [], []
        first = max(0, p - m.cfg.window_size + 1) if m.local[layer] else 0
        for j in range(first, p + 1):
            k_in = m.pre_norm(reads("k", p, j), ln)
            k = k_in @ m.kv_weight(layer, "W_K", head) + m.kv_weight(layer, "b_K", head)
            v = m.pre_norm(reads("v", p, j), ln) @ m.kv_weight(layer, "W_V", head) \
                + m.kv_weight(layer, "b_V", head)
            k = m.rotate(m.qk_norm(k, layer, "k", head, k_in), layer, j)
            scores.append(m.cap(q @ k / m.scale, m.cfg.attn_scores_soft_cap))
            values.append(v)
        attn = torch.softmax(torch.stack(scores), dim=0)
        z = sum(a * v for a, v in zip(attn, values))
        return z @ m.kv_weight(layer, "W_O", head)

    def logits(self) -> torch.Tensor:
        """[pos, vocab] the treeified model's output."""
        m, w = self.m, self.m.w
        rows = []
        for i in range(self.T):
            x = self.gather("out", ("out", "resid", i, i), (), i)
            x = m.layernorm(x, "ln_final")
            rows.append(m.cap(x @ w["unembed.W_U"] + w["unembed.b_U"], m.cfg.output_logits_soft_cap))
        return torch.stack(rows)

    def gather(self, node: str, step: tuple, suffix: tuple, j: int) -> torch.Tensor:
        """What `node` reads through `step` at source position j: its senders' private copies on
        this path, each layer's heads summed and normalized together where the model has a norm
        after attention (Gemma-2), biases added."""
        m, w = self.m, self.m.w
        total = m.constants(node)
        by_layer: dict[int, torch.Tensor] = {}
        for s in m.senders(node):
            value = self.value(s, (step,) + suffix, j)
            if m.post and s.startswith("a"):
                layer = int(s[1:].split(".")[0])
                by_layer[layer] = by_layer.get(layer, w[f"blocks.{layer}.attn.b_O"]) + value
            else:
                total = total + value
        for layer, heads in by_layer.items():
            total = total + m.layernorm(heads, f"blocks.{layer}.ln1_post")
        return total

    # ------------------------------------------------------------ |P| by enumeration
    def all_paths(self):
        """Every positional path, enumerated naively from the output down."""
        m = self.m

        def down(node, suffix, p):
            if node == "in":
                yield (("in", None, p, p),) + suffix
                return
            for ch in m.channels(node):
                for j in ([p] if ch in ("q", "resid") else range(p + 1)):
                    step = (node, ch, p, j)
                    for s in m.senders(node):
                        yield from down(s, (step,) + suffix, j)

        for i in range(self.T):
            yield from down("out", (), i)

    def count(self) -> tuple[int, int]:
        """(|P|, number of paths) for this example."""
        inside = total = 0
        for path in self.all_paths():
            total += 1
            inside += self.contains(self.h, path)
        return inside, total


# ---------------------------------------------------------------- random hypotheses
def random_hypothesis(rng: random.Random, model: Model, mask_names_1d, mask_names_2d, depth=0):
    """A random pattern mixing chains, restrictions, edge sets, unions and complements."""
    heads = [f"a{l}.{h}" for l in range(model.L) for h in range(model.H)]
    nodes = heads + ([f"m{l}" for l in range(model.L)] if model.mlp else [])
    globs = nodes + [f"a{l}.*" for l in range(model.L)] + (["m*"] if model.mlp else [])
    roll = rng.random()
    if depth < 2 and roll < 0.22:
        return ("not", random_hypothesis(rng, model, mask_names_1d, mask_names_2d, depth + 1))
    if depth < 2 and roll < 0.40:
        op = rng.choice(["or", "or", "and"])
        return (op, random_hypothesis(rng, model, mask_names_1d, mask_names_2d, depth + 1),
                random_hypothesis(rng, model, mask_names_1d, mask_names_2d, depth + 1))
    if roll < 0.52:
        names = ["in"] + nodes + ["out"]
        specs = []
        for _ in range(rng.randint(1, 6)):
            s = rng.choice(names[:-1])
            later = [n for n in names if n != "in" and s in model.senders(n)]
            if not later:
                continue
            r = rng.choice(later)
            c = rng.choice(["q", "k", "v", None]) if r.startswith("a") else None
            specs.append((s, r, c))
        if not specs:
            specs = [("in", "out", None)]
        return ("edges", rng.random() < 0.5, specs)
    slots = sorted({glob_rank(g) for g in globs})
    ranks = sorted(rng.sample(slots, rng.randint(1, min(3, len(slots)))))
    chosen = [rng.choice([g for g in globs if glob_rank(g) == r]) for r in ranks]
    steps = []
    for glob in chosen:
        if steps and steps[-1] != "..." and rng.random() < 0.3:
            steps.append("...")
        is_head = glob.startswith("a")
        ch = rng.choice(["q", "k", "v", None, None]) if is_head else None
        rs = []
        if rng.random() < 0.45:
            two_d = ch in ("k", "v")
            options = ["pos"] + (["offset", "src"] if two_d else [])
            if (mask_names_2d if two_d else mask_names_1d) and (not is_head or ch):
                options.append("mask")
            kind = rng.choice(options)
            if kind == "offset":
                rs.append(("offset", rng.choice([0, 1, 1, 2])))
            elif kind in ("pos", "src"):
                rs.append((kind, tuple(sorted(rng.sample(range(-1, 3), rng.randint(1, 2))))))
            else:
                rs.append(("mask", rng.choice(mask_names_2d if two_d else mask_names_1d)))
        steps.append((glob, ch, rs))
    if rng.random() < 0.3:
        steps.insert(0, ("in", None, [("pos", (rng.randint(0, 2),))] if rng.random() < 0.5 else []))
    if rng.random() < 0.3:
        steps.append(("out", None, []))
    return ("chain", steps)


def glob_rank(glob: str) -> float:
    """Where a glob's nodes sit, so random chains list steps in an order paths can take."""
    layer = int(glob[1]) if glob[1:2].isdigit() else 0
    return layer + (0.5 if glob.startswith("m") else 0)


def uses(h, kind) -> bool:
    if h[0] == kind:
        return True
    if h[0] == "chain":
        return kind == "restriction" and any(s != "..." and s[2] for s in h[1])
    return any(isinstance(x, tuple) and uses(x, kind) for x in h[1:])
