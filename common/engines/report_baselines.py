"""Two baselines of the report labeler: keyword matching with negation, and TF-IDF with logistic regression.

Both map report texts to ``(N, C)`` finding scores in the order of a findings table's ``findings``
(:func:`common.data.findings_table.load_findings_table`), so they fill the baseline columns of the labeler's metric
tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from common.data.findings_table import silver_entities

__all__ = ["KeywordLabeler", "TfidfLabeler"]


class KeywordLabeler:
    """Rule baseline: a finding is present when the report mentions it without negation.

    Mentions are the FINDING spans of :func:`common.data.findings_table.silver_entities` (the table's keywords and MeSH
    terms, NegEx-style negation). ``normal`` is not read from the text: it is 1 exactly when no other finding is.

    Args:
        table: a findings table from :func:`common.data.findings_table.load_findings_table`.

    Example:
        >>> KeywordLabeler(table).predict_proba(["Mild cardiomegaly. No pleural effusion."])  # 1 at cardiomegaly
    """

    def __init__(self, table: Mapping) -> None:
        if "findings" not in table or "keywords" not in table:
            raise ValueError(f"table should be a findings table with 'findings' and 'keywords', got {list(table)}.")
        self.table = table
        self.findings = list(table["findings"])
        self._column = {f: i for i, f in enumerate(self.findings)}

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Scores of ``texts``.

        Args:
            texts: N report texts.

        Returns:
            ``(N, C)`` float32 array of 0/1, C = ``len(table["findings"])``.
        """
        if isinstance(texts, str):
            raise ValueError("texts should be a sequence of report texts, got a single string.")
        scores = np.zeros((len(texts), len(self.findings)), dtype=np.float32)
        normal = self._column.get("normal")
        for row, text in enumerate(texts):
            for entity in silver_entities(text, self.table):
                if entity["type"] == "FINDING" and not entity["negated"] and entity["finding"] != "normal":
                    scores[row, self._column[entity["finding"]]] = 1.0
            if normal is not None:
                scores[row, normal] = float(not scores[row].any())
        return scores


class TfidfLabeler:
    """Bag-of-words baseline: TF-IDF of word 1-2 grams and one logistic regression per finding.

    ``TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)`` and, per class,
    ``LogisticRegression(C=C, class_weight="balanced", solver="liblinear", random_state=seed)``; a class with a single
    label value in training predicts that value (its prior). Fitting twice on the same data gives the same model.

    Args:
        C: inverse regularisation strength of the regressions. Default 1.0.
        seed: ``random_state`` of liblinear. Default 0.
        min_df: least number of training reports an n-gram must occur in. Default 2.

    Example:
        >>> TfidfLabeler().fit(texts, labels).predict_proba(texts).shape  # (N, C)
    """

    def __init__(self, C: float = 1.0, seed: int = 0, min_df: int = 2) -> None:
        if not C > 0:
            raise ValueError(f"C should be positive, got {C}.")
        self.C, self.seed, self.min_df = float(C), int(seed), int(min_df)
        self.vectorizer = None
        self.models: list = []

    def fit(self, texts: Sequence[str], labels) -> TfidfLabeler:
        """Fit on N texts and their ``(N, C)`` 0/1 labels; returns ``self``."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.shape[0] != len(texts) or not np.isin(labels, (0, 1)).all():
            raise ValueError(f"labels should be an (N, C) array of 0/1 with N = {len(texts)}, got {labels.shape}.")
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=self.min_df)
        features = self.vectorizer.fit_transform(texts)
        self.models = []
        for column in labels.T.astype(int):
            if column.min() == column.max():  # liblinear needs two classes; the prior is the one value seen
                self.models.append(float(column[0]))
                continue
            model = LogisticRegression(C=self.C, class_weight="balanced", solver="liblinear", random_state=self.seed)
            self.models.append(model.fit(features, column))
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities ``(N, C)`` float32 of each finding for N texts."""
        if self.vectorizer is None:
            raise ValueError("TfidfLabeler is not fitted; call fit(texts, labels) first.")
        features = self.vectorizer.transform(texts)
        columns = [
            np.full(len(texts), m) if isinstance(m, float) else m.predict_proba(features)[:, 1] for m in self.models
        ]
        return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((len(texts), 0), np.float32)
