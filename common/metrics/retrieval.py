"""Cross-modal retrieval metrics: Recall@K both ways between volumes and reports, region-text alignment, and how
well a reasoning step's text picks out its region's patches."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from ignite.metrics import Metric

from common.metrics.multilabel import roc_auc

__all__ = [
    "RetrievalMetric",
    "cross_modal_recall",
    "recall_at_k",
    "region_alignment_accuracy",
    "retrieval_metrics",
    "retrieval_table",
    "step_patch_auc",
]


def recall_at_k(similarity: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries (rows) with a positive among their ``k`` most similar candidates (columns).

    A query's rank is the number of candidates scoring strictly higher than its best positive, so ties count in the
    query's favour (identical texts give identical scores). Rows without a positive are left out.

    Args:
        similarity: ``(Q, N)`` scores.
        positives: ``(Q, N)`` bool, which candidates match each query.
        ks: cut-offs.

    Returns:
        ``{k: recall}``; NaN for every ``k`` when no row has a positive.

    Example::

        recall_at_k(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.eye(2, dtype=torch.bool), (1,))  # {1: 0.5}
    """
    if similarity.shape != positives.shape or similarity.dim() != 2:
        raise ValueError(f"similarity and positives should share a (Q, N) shape, got {list(similarity.shape)} and "
                         f"{list(positives.shape)}.")
    rows = positives.any(1)
    if not bool(rows.any()):
        return {int(k): math.nan for k in ks}
    sim, pos = similarity[rows].float(), positives[rows].bool()
    best = sim.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
    rank = (sim > best).sum(1)
    return {int(k): float((rank < k).float().mean()) for k in ks}


def cross_modal_recall(
    image: torch.Tensor, text: torch.Tensor, groups: Sequence[str] | None = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image->text and text->image Recall@K of paired embeddings (row ``i`` of each is one case).

    Args:
        image: ``(N, D)`` volume embeddings.
        text: ``(N, D)`` report embeddings.
        groups: ``N`` keys (e.g. the impression texts); cases with equal keys match each other, since their texts
            cannot tell them apart. Default: only the diagonal matches.
        ks: cut-offs.

    Returns:
        ``image_to_text_R@k`` and ``text_to_image_R@k`` for each ``k``.
    """
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(f"image and text should share an (N, D) shape, got {list(image.shape)} and "
                         f"{list(text.shape)}.")
    n = image.shape[0]
    if groups is None:
        positives = torch.eye(n, dtype=torch.bool)
    else:
        if len(groups) != n:
            raise ValueError(f"groups should have {n} entries, got {len(groups)}.")
        ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        key = torch.tensor([ids[g] for g in groups])
        positives = key[:, None] == key[None, :]
    sim = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    out = {}
    for name, s, p in (("image_to_text", sim, positives), ("text_to_image", sim.T, positives.T)):
        out.update({f"{name}_R@{k}": v for k, v in recall_at_k(s.cpu(), p, ks).items()})
    return out


def region_alignment_accuracy(
    image_regions: torch.Tensor, region_text: torch.Tensor, valid: torch.Tensor, present: torch.Tensor
) -> tuple[float, float, int]:
    """How often a region sentence is closest to its own region among the regions present in its volume.

    Args:
        image_regions: ``(B, R, D)`` region embeddings.
        region_text: ``(B, R, D)`` sentence embeddings, row ``r`` the sentences about region ``r + 1``.
        valid: ``(B, R)`` bool, region mentioned by the report and present in the volume.
        present: ``(B, R)`` bool, regions present in the volume (the candidates).

    Returns:
        ``(accuracy, chance, pairs)``: accuracy over the valid pairs, the expected accuracy of a random choice
        among the candidates, and the number of pairs; NaN accuracy and chance when there is none.
    """
    if image_regions.shape != region_text.shape or valid.shape != image_regions.shape[:2] \
            or present.shape != valid.shape:
        raise ValueError(f"image_regions and region_text should be (B, R, D) and valid, present (B, R), got "
                         f"{list(image_regions.shape)}, {list(region_text.shape)}, {list(valid.shape)}, "
                         f"{list(present.shape)}.")
    valid, present = valid.bool() & present.bool(), present.bool()
    b_idx, r_idx = torch.nonzero(valid, as_tuple=True)
    if len(b_idx) == 0:
        return math.nan, math.nan, 0
    img = F.normalize(image_regions.float(), dim=-1)
    txt = F.normalize(region_text.float(), dim=-1)[b_idx, r_idx]  # (P, D)
    scores = torch.einsum("pd,prd->pr", txt, img[b_idx]).masked_fill(~present[b_idx], float("-inf"))
    correct = scores.argmax(1) == r_idx
    chance = (1.0 / present[b_idx].sum(1).float()).mean()
    return float(correct.float().mean()), float(chance), int(len(b_idx))


def step_patch_auc(
    image_local: torch.Tensor,
    assignment: torch.Tensor,
    step_text: torch.Tensor,
    step_batch: torch.Tensor,
    step_region: torch.Tensor,
    inside: float = 0.5,
) -> list[float]:
    """Per reasoning step, whether its text is closer to the patches of its region than to patches outside it.

    For step ``s`` of case ``b`` about region ``r``, the patches of ``b`` are scored by the cosine similarity of
    their ``local`` embedding to the step's text; the step's value is the ROC AUC of those scores for the patches
    inside the region (at least ``inside`` of their voxels in it) against the patches with none of their voxels in it
    (0.5 = chance, 1 = every inside patch above every outside one). Partly covered patches are left out of both sides.
    Steps without a region, or whose region has no inside or no outside patch in the volume, are left out.

    Args:
        image_local: ``(B, N, D)`` per-patch embeddings.
        assignment: ``(B, N, R + 1)`` patch-to-region fractions (column 0 = no region).
        step_text: ``(S, D)`` step text embeddings.
        step_batch: ``(S,)`` case of each step.
        step_region: ``(S,)`` region id of each step (0 = none).
        inside: minimum fraction of a patch's voxels in the region for it to count as inside. Default 0.5.

    Returns:
        one AUC per scored step.
    """
    if image_local.dim() != 3 or assignment.shape[:2] != image_local.shape[:2] or step_text.dim() != 2 \
            or step_batch.shape != step_region.shape or step_batch.shape != step_text.shape[:1]:
        raise ValueError(f"image_local (B, N, D), assignment (B, N, R + 1), step_text (S, D), step_batch and "
                         f"step_region (S,) expected, got {list(image_local.shape)}, {list(assignment.shape)}, "
                         f"{list(step_text.shape)}, {list(step_batch.shape)}, {list(step_region.shape)}.")
    local = F.normalize(image_local.float(), dim=-1)
    text = F.normalize(step_text.float(), dim=-1)
    aucs = []
    for s, (b, r) in enumerate(zip(step_batch.tolist(), step_region.tolist())):
        if r <= 0:
            continue
        fraction = assignment[b, :, r].float()
        scored = (fraction >= inside) | (fraction == 0)
        positive = fraction[scored] >= inside
        if positive.all() or not positive.any():
            continue
        aucs.append(roc_auc((local[b] @ text[s])[scored], positive))
    return aucs


def retrieval_metrics(
    image: torch.Tensor,
    text: torch.Tensor,
    groups: Sequence[str] | None = None,
    image_regions: torch.Tensor | None = None,
    region_text: torch.Tensor | None = None,
    region_valid: torch.Tensor | None = None,
    region_present: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """:func:`cross_modal_recall` plus, with region inputs, ``region_alignment_accuracy`` (and its chance level
    and pair count), and the chance level of Recall@K for ``N`` cases (``chance_R@k`` = ``min(k, N) / N``)."""
    out = cross_modal_recall(image, text, groups, ks)
    n = image.shape[0]
    out.update({f"chance_R@{k}": min(k, n) / n for k in ks})
    if image_regions is not None:
        accuracy, chance, pairs = region_alignment_accuracy(image_regions, region_text, region_valid, region_present)
        out.update({"region_alignment_accuracy": accuracy, "chance_region_alignment": chance,
                    "region_pairs": pairs})
    out["cases"] = n
    return out


def retrieval_table(metrics: dict[str, float]) -> str:
    """Markdown table of :func:`retrieval_metrics`: one row per direction, one column per cut-off, then region
    alignment."""
    ks = sorted({int(k.split("@")[1]) for k in metrics if k.startswith("image_to_text_R@")})
    lines = ["| direction | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for name in ("image_to_text", "text_to_image", "chance"):
        cells = [metrics.get(f"{name}_R@{k}", math.nan) for k in ks]
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    if "region_alignment_accuracy" in metrics:
        lines += ["", "| region-text alignment accuracy | chance | pairs |", "|---|---|---|",
                  f"| {metrics['region_alignment_accuracy']:.3f} | {metrics['chance_region_alignment']:.3f} | "
                  f"{metrics['region_pairs']} |"]
    if "step_patch_auc" in metrics:
        lines += ["", "| step-patch AUC (step text vs patches in / out of its region) | chance | steps |",
                  "|---|---|---|", f"| {metrics['step_patch_auc']:.3f} | 0.500 | {metrics['step_patch_steps']} |"]
    return "\n".join(lines) + f"\n\n{metrics.get('cases', '?')} cases.\n"


class RetrievalMetric(Metric):
    """Ignite metric accumulating per-case embeddings and reporting :func:`retrieval_metrics` over the whole run.

    ``output_transform`` must return ``(image_global (B, D), text_global (B, D), impressions (B strings),
    image_region (B, R, D), region_text (B, R, D), region_valid (B, R), region_present (B, R))``, optionally followed
    by ``(image_local (B, N, D), assignment (B, N, R + 1), step_text (S, D), step_batch (S,), step_region (S,))``,
    which add ``step_patch_auc`` (:func:`step_patch_auc` averaged over every scored step) and ``step_patch_steps``;
    the default reads those keys of the engine output (the step keys when present). With ``name`` set, ``compute``
    returns that one number (e.g. ``"text_to_image_R@5"``, usable as a key metric); with ``name=None`` it returns the
    dict of all of them, which ignite also spreads into ``engine.state.metrics``.
    """

    KEYS = ("image_global", "text_global", "impressions", "image_region", "region_text", "region_valid",
            "region_present")
    # optional: when the output holds them, each case's steps are scored by :func:`step_patch_auc` as they come
    STEP_KEYS = ("image_local", "assignment", "step_text", "step_batch", "step_region")

    def __init__(self, name: str | None = "text_to_image_R@5", ks: Sequence[int] = (1, 5, 10),
                 output_transform: Callable | None = None) -> None:
        self.name = name
        self.ks = tuple(int(k) for k in ks)
        super().__init__(output_transform=output_transform or self._from_output)

    @classmethod
    def _from_output(cls, output) -> tuple:
        return tuple(output[k] for k in cls.KEYS) + tuple(output.get(k) for k in cls.STEP_KEYS)

    def reset(self) -> None:
        self._parts: dict[str, list] = {k: [] for k in self.KEYS}
        self._step_aucs: list[float] | None = None

    def update(self, output) -> None:
        steps = output[len(self.KEYS):]
        if len(steps) == len(self.STEP_KEYS) and all(v is not None for v in steps):
            self._step_aucs = (self._step_aucs or []) + step_patch_auc(*(v.detach().cpu() for v in steps))
        for key, value in zip(self.KEYS, output):
            if key == "impressions":
                self._parts[key].extend(value)
            else:
                self._parts[key].append(value.detach().float().cpu())

    def compute(self) -> float | dict[str, float]:
        if not self._parts["image_global"]:
            raise RuntimeError("RetrievalMetric needs at least one case before compute().")
        cat = {k: torch.cat(v) for k, v in self._parts.items() if k != "impressions"}
        result = retrieval_metrics(cat["image_global"], cat["text_global"], self._parts["impressions"],
                                   cat["image_region"], cat["region_text"], cat["region_valid"],
                                   cat["region_present"], self.ks)
        if self._step_aucs is not None:
            result["step_patch_auc"] = sum(self._step_aucs) / len(self._step_aucs) if self._step_aucs else math.nan
            result["step_patch_steps"] = len(self._step_aucs)
        if self.name is None:
            return result
        if self.name not in result:
            raise KeyError(f"name should be one of {sorted(result)}, got {self.name!r}.")
        return result[self.name]
