"""Pending encodes: the third part of a step (report §3.3), after its decodes and chunked
prefills: images of requests not yet prefilled that far, encoded ahead of their prefill
within a per-step encode budget, in the same vision-tower call as the images the step's
chunks reach now.

    step = decodes ─► chunked prefills ─► pending encodes
                                          │ images the chunks reach now (always; counted first)
                                          │ then, in arrival order, the later images of prompts
                                          │ being prefilled and the images of waiting prompts,
                                          └ while <= max_images images and <= max_tokens rows

So when a waiting request's prefill starts, its images are ready and its first chunks are
pure language-model work. Embeddings are the same whenever they are computed (greedy output
does not change); what changes is when the tower's cost is paid. The profiler
(`xllm sim profile-epd`) sets the budget that keeps a step under the TPOT SLO.

Only prompts with images not yet encoded are tracked (`add`); with none, `plan` returns at
once, so text-only traffic pays one empty-dict check per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xllm.engine.multimodal import MultimodalPrompt
    from xllm.engine.scheduler import SchedulerOutput
    from xllm.engine.sequence import Sequence

Encode = tuple["MultimodalPrompt", int]
"""(prompt, image index): one image to run the tower on."""


class EncodeAhead:
    def __init__(self, max_images: int, max_tokens: int = 0):
        assert max_images > 0
        self.max_images = max_images
        self.max_tokens = max_tokens
        """Image tokens (embedding rows) a step's encodes produce at most; 0 = no limit."""
        self.unencoded: dict[MultimodalPrompt, Sequence] = {}
        """Prompts with an image not encoded yet, in arrival order."""
        self.num_encoded_ahead = 0
        """Images planned ahead of the chunk that reaches them (cumulative)."""

    def add(self, seq: Sequence) -> None:
        if seq.mm is not None and any(e is None for e in seq.mm.embeddings):
            self.unencoded[seq.mm] = seq

    def plan(self, out: SchedulerOutput) -> list[Encode]:
        """The images to encode ahead in the step `out` schedules."""
        if not self.unencoded:
            return []
        reached = {}  # prompt -> [start, end) of the tokens this step computes
        for item in out.scheduled:
            if item.seq.mm is not None:
                start = item.seq.num_computed_tokens
                reached[item.seq.mm] = (start, start + item.num_new_tokens)
        pending = self._pending(reached)
        images, tokens = 0, 0
        for mm, k, needed in pending:  # needed first: they run whatever the budget
            if needed:
                images, tokens = images + 1, tokens + mm.spans[k][1]
        ahead: list[Encode] = []
        for mm, k, needed in pending:
            count = mm.spans[k][1]
            if needed:
                continue
            if images + 1 > self.max_images or (
                self.max_tokens and tokens + count > self.max_tokens
            ):
                break  # in order: a later image never jumps an earlier one
            images, tokens = images + 1, tokens + count
            ahead.append((mm, k))
        self.num_encoded_ahead += len(ahead)
        return ahead

    def _pending(self, reached: dict) -> list[tuple[MultimodalPrompt, int, bool]]:
        """(prompt, image, reached this step) of every image without embeddings; forgets
        prompts that are done (encoded, or their sequence finished)."""
        pending = []
        for mm, seq in list(self.unencoded.items()):
            missing = [k for k, e in enumerate(mm.embeddings) if e is None]
            if not missing or seq.is_finished:
                del self.unencoded[mm]
                continue
            lo, hi = reached.get(mm, (0, 0))
            for k in missing:
                start, count = mm.spans[k]
                pending.append((mm, k, start < hi and lo < start + count))
        return pending
