"""Where does attribute binding fail: in the text encoder or in the UNet? (issue 3, novel alignment)

    python -m bench.binding [--model DIR] [--train 3000]

Two-object held-out prompts ("a yellow diamond and a small cyan square") fail alignment mostly because a colour
goes to the wrong object, to both, or to none. This benchmark asks whether the text encoder's output, which the
UNet reads through cross-attention, carries the binding at all: a linear probe (multinomial logistic regression)
reads the colour bound to each object off single hidden states of the conditioning, trained on ``--train`` random
two-object captions of the training distribution (all phrasings, held-out contents excluded) and tested on the
held-out two-object prompts, whose colour-shape combinations the model never saw together.

- ``noun1_to_colour1`` / ``noun2_to_colour2``: the hidden state at an object's shape word -> that object's colour.
- ``noun2_to_colour1`` / ``eos_to_colour1`` / ``eos_to_colour2``: the other object's colour, and both from the
  end-of-text state (the causal encoder's summary).
- ``control_embedding_noun1_to_colour1``: the same probe on the encoder's *input* (token plus position embedding,
  no context) at the first shape word. It can only read the word's position, which gives a colour away only
  where the colour name is two tokens ("cyan" is "cy" + "an"): about 0.2 (chance 1/8), so a high figure above
  is the encoder's doing, not the probe's.

Held-out accuracy near 1 means the conditioning states which colour goes with which shape, even for unseen
combinations, and what fails is the UNet's use of it.

The second part looks at that use: the UNet's cross-attention (every ``attn2``) on ``--attention-pairs`` held-out
pairs, with true renders of each pair noised to timesteps 999, 700 and 400 (the training distribution: where the
objects are is known), one cond pass each.

- ``mass``: the share of attention probability (mean over heads and image positions) on BOS, the colour words, the
  shape words, the other words, end-of-text and padding.
- ``routing``: inside each object's pixels (its colour in the render, at the layer's resolution), the share of the
  two colour words' attention that goes to that object's own colour word, and the same for the shape words. 0.5 is
  no routing (both objects read both colours); 1.0 is perfect. Averaged over heads: a head that routes and one that
  routes the other way cancel.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from dejaguard.core.denoiser import Denoiser, load_denoiser
from dejaguard.core.testbed import data

COLORS = list(data.COLORS)


def _pair_specs(count: int, seed: int) -> tuple[list[data.SceneSpec], list[data.SceneSpec]]:
    """``count`` random training-distribution pairs (held-out contents excluded) and the held-out pairs."""
    heldout = data.heldout_specs()
    held = [s for s in heldout if len(s.objects) == 2]
    excluded = {s.canonical().caption() for s in heldout}
    rng = np.random.default_rng(seed)
    train: list[data.SceneSpec] = []
    while len(train) < count:
        spec = data.random_spec(rng, 2)
        if spec.canonical().caption() not in excluded:
            train.append(spec)
    return train, held


@torch.no_grad()
def binding_features(text_encoder: torch.nn.Module, tokenizer, specs: list[data.SceneSpec]) -> dict[str, torch.Tensor]:
    """Per caption: the last hidden state ``(N, D)`` at each shape word and at end-of-text, the input embedding
    at the first shape word, and the two objects' colour indices ``(N,)``."""
    shape_ids = {tokenizer.convert_tokens_to_ids(f"{s}</w>") for s in data.SHAPES}
    ids = tokenizer([s.caption() for s in specs], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    param = next(text_encoder.parameters())
    out = text_encoder(ids.to(param.device), output_hidden_states=True)
    last, first = out.last_hidden_state.float().cpu(), out.hidden_states[0].float().cpu()
    rows: dict[str, list] = {k: [] for k in ("noun1", "noun2", "eos", "embedding_noun1", "colour1", "colour2")}
    for i, spec in enumerate(specs):
        row = ids[i].tolist()
        nouns = [j for j, t in enumerate(row) if t in shape_ids]
        if len(nouns) != 2:
            raise ValueError(f"expected two shape words in {spec.caption()!r}")
        eos = row.index(tokenizer.eos_token_id)
        rows["noun1"].append(last[i, nouns[0]])
        rows["noun2"].append(last[i, nouns[1]])
        rows["eos"].append(last[i, eos])
        rows["embedding_noun1"].append(first[i, nouns[0]])
        rows["colour1"].append(COLORS.index(spec.objects[0].color))
        rows["colour2"].append(COLORS.index(spec.objects[1].color))
    return {k: torch.stack(v) if isinstance(v[0], torch.Tensor) else torch.tensor(v) for k, v in rows.items()}


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   iterations: int = 500, seed: int = 0) -> tuple[float, float]:
    """Train and test accuracy of a linear softmax probe ``(N, D) -> (N,)`` classes, on standardized features."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    probe = torch.nn.Linear(x_train.shape[1], len(COLORS))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(iterations):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(x_train), y_train).backward()
            opt.step()
    with torch.no_grad():
        return ((probe(x_train).argmax(1) == y_train).float().mean().item(),
                (probe(x_test).argmax(1) == y_test).float().mean().item())


PROBES = {  # name: (feature, target)
    "noun1_to_colour1": ("noun1", "colour1"),
    "noun2_to_colour2": ("noun2", "colour2"),
    "noun2_to_colour1": ("noun2", "colour1"),
    "eos_to_colour1": ("eos", "colour1"),
    "eos_to_colour2": ("eos", "colour2"),
    "control_embedding_noun1_to_colour1": ("embedding_noun1", "colour1"),
}


TOKEN_KINDS = ("bos", "colour", "shape", "other_words", "eos", "padding")
ATTENTION_TIMESTEPS = (999, 700, 400)


def token_roles(denoiser: Denoiser, spec: data.SceneSpec, length: int = 77) -> list[str]:
    """Per text position of ``spec``'s caption: its kind (:data:`TOKEN_KINDS`), with colour and shape words
    tagged by object (``colour1``, ``shape2``, ...)."""
    pieces = denoiser.prompt_tokens(spec.caption())
    roles = ["bos"]
    word: list[int] = []  # positions of the current word's pieces
    colours = shapes = 0
    for piece in pieces:
        roles.append("other_words")
        word.append(len(roles) - 1)
        if not piece.endswith("</w>"):
            continue
        text = "".join(pieces[j - 1] for j in word).replace("</w>", "")
        if text in data.COLORS:
            colours += 1
            role = f"colour{colours}"
        elif text in data.SHAPES:
            shapes += 1
            role = f"shape{shapes}"
        else:
            role = "other_words"
        for j in word:
            roles[j] = role
        word = []
    if colours != 2 or shapes != 2:
        raise ValueError(f"expected two colour and two shape words in {spec.caption()!r}")
    return roles + ["eos"] + ["padding"] * (length - len(roles) - 1)


class _CrossAttentionRecorder:
    """Forward hooks on every ``attn2.to_q`` / ``attn2.to_k``: after a UNet pass, ``probabilities()`` gives each
    layer's attention ``(B, N, L)`` (mean over heads; N image positions, L text positions)."""

    def __init__(self, denoiser: Denoiser):
        self.layers = {name: module for name, module in denoiser.named_modules() if name.endswith("attn2")}
        self.outputs: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.layers}
        self.handles = []
        for name, module in self.layers.items():
            for part in ("to_q", "to_k"):
                self.handles.append(getattr(module, part).register_forward_hook(self._keep(name, part)))

    def _keep(self, name: str, part: str):
        def hook(_module, _inputs, output):
            self.outputs[name][part] = output.detach().float()
        return hook

    def probabilities(self) -> dict[str, torch.Tensor]:
        probs = {}
        for name, module in self.layers.items():
            q, k = self.outputs[name]["to_q"], self.outputs[name]["to_k"]
            heads = module.heads
            b, n, inner = q.shape
            q = q.view(b, n, heads, inner // heads).transpose(1, 2)
            k = k.view(b, k.shape[1], heads, inner // heads).transpose(1, 2)
            probs[name] = torch.softmax(q @ k.transpose(-1, -2) * (inner // heads) ** -0.5, dim=-1).mean(1)
        return probs

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _own_share(p: torch.Tensor, region: torch.Tensor, own: torch.Tensor, other: torch.Tensor) -> float | None:
    """Mean over the positions in ``region (N,)`` of ``p(own) / (p(own) + p(other))``; ``p (N, L)``."""
    if not region.any():
        return None
    a, b = p[region][:, own].sum(1), p[region][:, other].sum(1)
    return (a / (a + b)).mean().item()


@torch.no_grad()
def cross_attention_routing(denoiser: Denoiser, specs: list[data.SceneSpec], seed: int = 0,
                            timesteps: tuple[int, ...] = ATTENTION_TIMESTEPS) -> dict:
    """Attention mass per token kind and colour / shape routing into each object's region (see the module
    docstring), per timestep, averaged over ``specs`` and all ``attn2`` layers (and per layer, at t = 700)."""
    rng = np.random.default_rng(seed)
    renders = np.stack([data.render_scene(s, rng) for s in specs])
    regions = torch.from_numpy(np.stack([[data.color_match_mask(img, o.color) for o in s.objects]
                                         for img, s in zip(renders, specs)])).float()  # (B, 2, 32, 32)
    roles = [token_roles(denoiser, s) for s in specs]
    latents = denoiser.vae.encode_thumbnail(torch.from_numpy(renders).to(denoiser.device))
    embeddings = denoiser.encode_prompts([s.caption() for s in specs])
    alphas = denoiser.new_scheduler().alphas_cumprod
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
    recorder = _CrossAttentionRecorder(denoiser)
    result: dict = {"pairs": len(specs), "layers": len(recorder.layers), "unet_evals": 0, "by_timestep": {}}
    try:
        for t in timesteps:
            a = alphas[t].item()
            denoiser.predict_noise(a ** 0.5 * latents + (1 - a) ** 0.5 * noise, t, embeddings)
            result["unet_evals"] += len(specs)
            per_layer = {}
            for name, p in recorder.probabilities().items():
                side = int(round(p.shape[1] ** 0.5))
                area = torch.nn.functional.adaptive_avg_pool2d(regions, side).flatten(2) > 0.5  # (B, 2, N)
                mass = {k: [] for k in TOKEN_KINDS}
                colour_share, shape_share = [], []
                for i, r in enumerate(roles):
                    kind_of = [x.rstrip("12") for x in r]
                    for k in TOKEN_KINDS:
                        mass[k].append(p[i][:, [j for j, x in enumerate(kind_of) if x == k]].sum(1).mean().item())
                    for obj, other in ((1, 2), (2, 1)):
                        for word, out in (("colour", colour_share), ("shape", shape_share)):
                            own = torch.tensor([x == f"{word}{obj}" for x in r])
                            alt = torch.tensor([x == f"{word}{other}" for x in r])
                            share = _own_share(p[i], area[i, obj - 1], own, alt)
                            if share is not None:
                                out.append(share)
                per_layer[name] = {"mass": {k: float(np.mean(v)) for k, v in mass.items()},
                                   "colour_routing": float(np.mean(colour_share)) if colour_share else None,
                                   "shape_routing": float(np.mean(shape_share)) if shape_share else None}
            routed = [v for v in per_layer.values() if v["colour_routing"] is not None]
            result["by_timestep"][str(t)] = {
                "mass": {k: float(np.mean([v["mass"][k] for v in per_layer.values()])) for k in TOKEN_KINDS},
                "colour_routing": float(np.mean([v["colour_routing"] for v in routed])),
                "shape_routing": float(np.mean([v["shape_routing"] for v in routed])),
            }
            if t == 700:
                result["by_layer_t700"] = per_layer
    finally:
        recorder.close()
    return result


def run(model: Path | None = None, train_count: int = 3000, seed: int = 0, attention_pairs: int = 64) -> dict:
    denoiser = load_denoiser(model)
    train, held = _pair_specs(train_count, seed)
    a = binding_features(denoiser.text_encoder, denoiser.tokenizer, train)
    b = binding_features(denoiser.text_encoder, denoiser.tokenizer, held)
    result: dict = {"train_captions": len(train), "heldout_pairs": len(held), "chance": 1 / len(COLORS)}
    for name, (feature, target) in PROBES.items():
        train_acc, test_acc = probe_accuracy(a[feature], a[target], b[feature], b[target], seed=seed)
        result[name] = {"train": round(train_acc, 3), "heldout": round(test_acc, 3)}
    if attention_pairs > 0:
        result["attention"] = cross_attention_routing(denoiser, held[:attention_pairs], seed=seed)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="diffusers-format folder (default: the bundled testbed)")
    p.add_argument("--train", type=int, default=3000, help="training captions for the probes (default 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-pairs", type=int, default=64,
                   help="held-out pairs for the cross-attention part (default 64; 0 skips it)")
    args = p.parse_args()
    result = run(args.model, args.train, args.seed, args.attention_pairs)
    for name in PROBES:
        print(f"{name:38s} train {result[name]['train']:.3f}  held-out {result[name]['heldout']:.3f}")
    for t, row in result.get("attention", {}).get("by_timestep", {}).items():
        mass = "  ".join(f"{k} {v:.2f}" for k, v in row["mass"].items())
        print(f"t={t:>3}: attention mass {mass}; routing colour {row['colour_routing']:.2f} "
              f"shape {row['shape_routing']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
