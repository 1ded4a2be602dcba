"""Index of the embeddings written by an encoder run, and text queries answered with the closest volumes."""

from __future__ import annotations

import json
import time
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn

from common.bundle.args import as_bool
from common.engines.contrastive import embed_texts

__all__ = ["EmbeddingIndexWriter"]

logger = logging.getLogger(__name__)


class EmbeddingIndexWriter:
    """Collect each completed case's embeddings and, at the end of the run, write:

    - ``<index_name>``: ``{"embedding_dim", "regions", "cases": [{"case", "source", "global", "regions",
      "preview", "regions_present"}]}`` with the paths :class:`common.transforms.SaveEmbeddingsd` wrote;
    - ``<topk_name>``: for each text query its ``top_k`` volumes by cosine similarity of the global embeddings,
      ``[{"query", "top_k": [{"case", "source", "score"}, ...]}, ...]``.

    Existing outputs are kept unless ``overwrite``: a run whose cases were all skipped writes nothing, and one
    that completed new cases writes its index and answers beside them as ``<name>_<time>.json``. Needs the engine
    output after post-processing (one dict per case with ``pred`` and ``embedding_files``).

    Args:
        output_dir: output folder.
        text_encoder: a :class:`common.networks.TextEncoder` (trained projection loaded) or an
            :class:`common.engines.ImageTextModel`.
        queries: texts to answer; empty for none.
        top_k: volumes per query. Default 5.
        region_names: names of region ids ``1..R``. Default ``None``.
        overwrite: replace existing outputs. Default False.
        index_name: Default ``embeddings_index.json``.
        topk_name: Default ``text_query_topk.json``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        text_encoder: nn.Module,
        queries: Sequence[str] = (),
        top_k: int = 5,
        region_names: Sequence[str] | None = None,
        overwrite: bool = False,
        index_name: str = "embeddings_index.json",
        topk_name: str = "text_query_topk.json",
    ) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k should be a positive integer, got {top_k}.")
        queries = [queries] if isinstance(queries, str) else list(queries)
        blank = [i for i, q in enumerate(queries) if not isinstance(q, str) or not q.strip()]
        if blank:
            raise ValueError(f"queries should be non-empty strings, got empty queries at {blank}.")
        self.output_dir = Path(output_dir)
        self.text_encoder = text_encoder
        self.queries = queries
        self.top_k = top_k
        self.region_names = list(region_names) if region_names is not None else None
        self.overwrite = as_bool(overwrite, "overwrite")
        self.paths = {"index": self.output_dir / index_name, "topk": self.output_dir / topk_name}
        self.cases: list[dict] = []
        self.embeddings: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _started(self, engine: Engine) -> None:
        self.kept = [str(p) for p in self.paths.values() if p.exists()] if not self.overwrite else []
        self.cases, self.embeddings = [], []

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else []:
            files = item.get("embedding_files")
            if files is None:
                continue
            present = torch.as_tensor(item["pred"]["region_present"]).cpu()
            self.cases.append({
                "case": Path(files["global"]).name[: -len("_global.npy")],
                "source": str(item["image"].meta.get("filename_or_obj", "")) if hasattr(item["image"], "meta")
                else "",
                "global": files["global"], "regions": files["regions"], "preview": files["preview"],
                "regions_present": [i + 1 for i in torch.nonzero(present).flatten().tolist()],
            })
            self.embeddings.append(item["pred"]["global"].detach().float().cpu())

    def _answers(self) -> list[dict]:
        if not self.queries or not self.embeddings:
            return []
        with torch.no_grad():
            text = embed_texts(self.text_encoder, self.queries).float().cpu()
        scores = F.normalize(text, dim=-1) @ F.normalize(torch.stack(self.embeddings), dim=-1).T
        k = min(self.top_k, len(self.cases))
        top = scores.topk(k, dim=1)
        return [{"query": q, "top_k": [{"case": self.cases[j]["case"], "source": self.cases[j]["source"],
                                        "score": round(float(s), 6)} for s, j in zip(vals.tolist(), idx.tolist())]}
                for q, vals, idx in zip(self.queries, top.values, top.indices)]

    def _write(self, engine: Engine) -> None:
        paths = self.paths
        if self.kept:  # an earlier run's index stays as it is; this run's cases, if any, get files of their own
            logger.warning("kept %s (set overwrite to true to replace them)", ", ".join(self.kept))
            if not self.cases:
                return
            stamp = time.strftime("%Y%m%d-%H%M%S")
            paths = {k: p.with_name(f"{p.stem}_{stamp}{p.suffix}") for k, p in paths.items()}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        dim = int(self.embeddings[0].numel()) if self.embeddings else None
        index = {"embedding_dim": dim, "regions": self.region_names, "cases": self.cases}
        paths["index"].write_text(json.dumps(index, indent=4) + "\n")
        paths["topk"].write_text(json.dumps(self._answers(), indent=4) + "\n")
        logger.info("embeddings of %d case(s) indexed in %s; %d text queries answered in %s", len(self.cases),
                    paths["index"], len(self.queries), paths["topk"])
