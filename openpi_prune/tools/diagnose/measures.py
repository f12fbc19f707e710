"""`diagnose`'s measures: the geometry of the raw embeddings that explains a collapse, and the hints
it gives."""

import numpy as np

TOP_DIMS = 4  # dimensions counted as "massive activations" in the geometry table


# ----------------------------------------------------------------------------------------------------------------------
# Geometry of the raw embeddings


def geometry(tokens: np.ndarray, top: int = TOP_DIMS) -> dict[str, float]:
    """How anisotropic a set of tokens [k, d] is.

    shared            share of their energy along their mean direction (1/d for isotropic tokens;
                      near 1 when one direction dominates: LightVLA's weight-free RMS norm keeps it,
                      and every query then points the same way)
    top_dims          share of their energy in the `top` largest dimensions (top/d if isotropic)
    top_dims_centred  the same after removing the mean: dimensions that are huge *and vary*
                      ("massive activations"), which centring alone does not remove
    """
    x = np.asarray(tokens, np.float64)
    k, d = x.shape
    energy = max(float(np.sum(x**2)), 1e-30)
    mean = x.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    shared = float(np.sum((x @ (mean / norm)) ** 2) / energy) if norm > 0 else 0.0
    per_dim = np.sort(np.sum(x**2, axis=0))[::-1]
    centred = np.sort(np.sum((x - mean) ** 2, axis=0))[::-1]
    return {
        "tokens": k,
        "width": d,
        "shared": shared,
        "top_dims": float(per_dim[:top].sum() / energy),
        "top_dims_centred": float(centred[:top].sum() / max(centred.sum(), 1e-30)),
        "isotropic": min(top, d) / d,
    }


def embedding_geometry(model, observation) -> dict[str, dict[str, float]]:
    """Geometry of the live cameras' patch tokens and the live prompt tokens, as `embed_prefix` makes them."""
    patches = []
    for name, image in observation.images.items():
        if bool(np.asarray(observation.image_masks[name])[0]):
            tokens, _ = model.PaliGemma.img(image[:1], train=False)
            patches.append(np.asarray(tokens[0], np.float32))
    text = model.PaliGemma.llm(observation.tokenized_prompt[:1], method="embed")
    live = np.asarray(observation.tokenized_prompt_mask)[0]
    return {
        "image patches": geometry(np.concatenate(patches)),
        "prompt tokens": geometry(np.asarray(text[0], np.float32)[live]),
    }


def hints(geo: dict[str, dict[str, float]]) -> list[str]:
    shared = [f"{what} {g['shared']:.0%}" for what, g in geo.items() if g["shared"] > 0.5]
    massive = [
        f"{what} {g['top_dims_centred']:.0%}"
        for what, g in geo.items()
        if g["top_dims_centred"] > max(0.2, 10 * g["isotropic"])
    ]
    hints = []
    if shared:
        hints.append(
            f"One shared direction holds most of the energy ({', '.join(shared)}). LightVLA's weight-free RMS norm "
            "keeps it, so every patch's query points the same way and every row votes for the same few patches. "
            "Scoring 'centred' or 'robust' removes it."
        )
    if massive:
        hints.append(
            f"After centring, {TOP_DIMS} dimensions still hold much of the energy ({', '.join(massive)}): massive "
            "activations, which decide every similarity. Scoring 'robust' (per-dimension median / MAD, clipped) "
            "gives each dimension an equal say."
        )
    return hints
