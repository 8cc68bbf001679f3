"""A synthetic language for the transformer lab: topic-conditioned Markov chains, in NumPy.

Vocabulary: ``PAD=0``, ``BOS=1``, ``SEP=2``, then ``n_topics`` topic tokens, then ``n_content``
content tokens. Each topic ``k`` owns a Markov chain over the content tokens (start
distribution and transition rows drawn from ``Dirichlet(concentration)``; a small concentration
makes sparse, low-entropy rows). A sequence is::

    [BOS, TOPIC_k, x_1, ..., x_P, SEP, y_1, ..., y_R]

where ``x_1..x_P, y_1..y_R`` is one run of topic ``k``'s chain: the prompt is
``BOS .. SEP`` and the response is ``y``. Every sequence has the same length
``T = P + R + 3``, so no padding is needed; the response mask marks the last ``R`` positions.

Preference data (:func:`make_lab_data`):

- **chosen**: a fresh sample of the language for the prompt (on-distribution);
- **rejected**: the same prompt with ``R`` content tokens drawn uniformly at random: off-policy
  and improbable under a model that learned the sparse chains;
- **probes** (five sets, never trained on): ``fresh`` language samples, ``off_topic`` responses
  from another topic's chain, ``reversed`` and ``shuffled`` responses, and ``repeat`` (one
  content token repeated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BOS", "PAD", "PROBE_SETS", "SEP", "Language", "LabData", "make_lab_data"]

PAD, BOS, SEP = 0, 1, 2
PROBE_SETS: tuple[str, ...] = ("fresh", "off_topic", "reversed", "shuffled", "repeat")


@dataclass(frozen=True)
class Language:
    """``n_topics`` Markov chains over ``n_content`` tokens; prompts of ``prompt_len`` content
    tokens, responses of ``response_len``."""

    start: np.ndarray  # (K, C) start distribution per topic
    trans: np.ndarray  # (K, C, C) transition rows per topic
    prompt_len: int
    response_len: int

    @property
    def n_topics(self) -> int:
        return int(self.start.shape[0])

    @property
    def n_content(self) -> int:
        return int(self.start.shape[1])

    @property
    def vocab(self) -> int:
        return 3 + self.n_topics + self.n_content

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len + 3

    @property
    def response_start(self) -> int:
        """Index of the first response token."""
        return self.prompt_len + 3

    def content_token(self, c: np.ndarray) -> np.ndarray:
        return 3 + self.n_topics + c

    def response_mask(self, n: int) -> np.ndarray:
        """``(n, T)`` 0/1 mask of the response positions."""
        mask = np.zeros((n, self.seq_len), dtype=np.int64)
        mask[:, self.response_start :] = 1
        return mask

    def full_mask(self, n: int) -> np.ndarray:
        """``(n, T)`` mask of every position after ``BOS`` (for SFT on whole sequences)."""
        mask = np.ones((n, self.seq_len), dtype=np.int64)
        mask[:, 0] = 0
        return mask

    def _chains(
        self, rng: np.random.Generator, topics: np.ndarray, length: int, first: np.ndarray | None
    ) -> np.ndarray:
        """Content-token chains ``(n, length)``; ``first``: optional previous token per row."""
        n = topics.shape[0]
        out = np.empty((n, length), dtype=np.int64)
        u = rng.random((n, length))
        prev = first
        for t in range(length):
            probs = self.start[topics] if prev is None else self.trans[topics, prev]
            cdf = np.cumsum(probs, axis=1)
            cdf[:, -1] = 1.0
            prev = np.minimum((u[:, t : t + 1] > cdf).sum(axis=1), self.n_content - 1)
            out[:, t] = prev
        return out

    def sample(
        self, rng: np.random.Generator, n: int, topics: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` sequences ``(n, T)`` of the language and their topics ``(n,)``."""
        if topics is None:
            topics = rng.integers(0, self.n_topics, size=n)
        chain = self._chains(rng, topics, self.prompt_len + self.response_len, None)
        return self.assemble(topics, chain[:, : self.prompt_len], chain[:, self.prompt_len :]), (
            topics
        )

    def assemble(self, topics: np.ndarray, prompt: np.ndarray, response: np.ndarray) -> np.ndarray:
        """Token ids from topics ``(n,)`` and content indices ``(n, P)``, ``(n, R)``."""
        n = topics.shape[0]
        return np.concatenate(
            [
                np.full((n, 1), BOS),
                (3 + topics)[:, None],
                self.content_token(prompt),
                np.full((n, 1), SEP),
                self.content_token(response),
            ],
            axis=1,
        ).astype(np.int64)

    def split(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inverse of :meth:`assemble`: topics, prompt and response content indices."""
        off = 3 + self.n_topics
        return (
            tokens[:, 1] - 3,
            tokens[:, 2 : 2 + self.prompt_len] - off,
            tokens[:, self.response_start :] - off,
        )

    def entropy_rate(self) -> float:
        """Mean entropy (nats) of the transition rows: a floor for the per-token NLL."""
        p = self.trans
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
        return float(h.mean())


def make_language(
    seed: int,
    n_topics: int = 4,
    n_content: int = 17,
    concentration: float = 0.1,
    prompt_len: int = 2,
    response_len: int = 6,
) -> Language:
    """A random :class:`Language` for ``seed`` (its own random stream)."""
    rng = np.random.default_rng([seed, 0x6A7E])
    alpha = np.full(n_content, concentration)
    start = rng.dirichlet(alpha, size=n_topics)
    trans = rng.dirichlet(alpha, size=(n_topics, n_content))
    return Language(start, trans, prompt_len, response_len)


@dataclass
class LabData:
    """Everything the transformer lab trains and evaluates on, for one seed (NumPy arrays).

    ``train_chosen``/``train_rejected``: ``(n_pairs, T)`` token ids sharing prompts;
    ``heldout_chosen``/``heldout_rejected``: ``(n_heldout, T)``; ``probes``: name ->
    ``(n_probe, T)``; ``mask``: the response mask ``(1, T)``, the same for every sequence.
    """

    language: Language
    train_chosen: np.ndarray
    train_rejected: np.ndarray
    heldout_chosen: np.ndarray
    heldout_rejected: np.ndarray
    probes: dict[str, np.ndarray]
    mask: np.ndarray


def _rejected(lang: Language, rng: np.random.Generator, chosen: np.ndarray) -> np.ndarray:
    out = chosen.copy()
    n = chosen.shape[0]
    out[:, lang.response_start :] = lang.content_token(
        rng.integers(0, lang.n_content, size=(n, lang.response_len))
    )
    return out


def make_lab_data(lang: Language, seed: int, n_pairs: int, n_heldout: int, n_probe: int) -> LabData:
    """Preference pairs, held-out pairs and the five probe sets for ``seed``."""
    rng = np.random.default_rng([seed, 0xDA7A])
    train_chosen, _ = lang.sample(rng, n_pairs)
    train_rejected = _rejected(lang, rng, train_chosen)
    heldout_chosen, _ = lang.sample(rng, n_heldout)
    heldout_rejected = _rejected(lang, rng, heldout_chosen)

    probes: dict[str, np.ndarray] = {}
    probes["fresh"], _ = lang.sample(rng, n_probe)
    base, topics = lang.sample(rng, n_probe)
    other = (topics + rng.integers(1, lang.n_topics, size=n_probe)) % lang.n_topics
    _, prompt, _ = lang.split(base)
    resp = lang._chains(rng, other, lang.response_len, prompt[:, -1])
    probes["off_topic"] = lang.assemble(topics, prompt, resp)
    base, topics = lang.sample(rng, n_probe)
    _, prompt, resp = lang.split(base)
    probes["reversed"] = lang.assemble(topics, prompt, resp[:, ::-1])
    base, topics = lang.sample(rng, n_probe)
    _, prompt, resp = lang.split(base)
    probes["shuffled"] = lang.assemble(topics, prompt, rng.permuted(resp, axis=1))
    base, topics = lang.sample(rng, n_probe)
    _, prompt, _ = lang.split(base)
    token = rng.integers(0, lang.n_content, size=(n_probe, 1))
    probes["repeat"] = lang.assemble(topics, prompt, np.repeat(token, lang.response_len, axis=1))
    return LabData(
        lang,
        train_chosen,
        train_rejected,
        heldout_chosen,
        heldout_rejected,
        probes,
        lang.response_mask(1),
    )
