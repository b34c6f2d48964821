"""Weighted prompts' embeddings as compel computes them, with the engines' text encoder in place of PyTorch's.

compel's EmbeddingsProvider does the weighting: a token of weight w moves from the empty prompt's embedding by
w times its own offset, and a fragment weighted below 1 is blended toward the prompt without it. It asks its
text encoder for hidden states of token ids; here that is the engines' text encoder (ONNX Runtime, OpenVINO,
TensorRT or a BLS call when served, LoRA variants included), so weights cost text-encoder calls only.

Choices, so that a weighted prompt is what compel gives with the same text encoder:
- Below 1, compel's REMOVE mode (the fragment left out of the tokens), not its default MASK: masking needs an
  attention mask, and the engines' text encoder takes none (diffusers' SD pipelines never pass one).
- Long prompts in plain 75-token chunks (compel's BRUTAL split), as voltacache chunks any prompt.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ..errors import VoltacacheError
from ..prompts import WeightedPrompt
from ..specs import POOLED_EMBEDDING, TEXT_EMBEDDINGS, TEXT_IDS


class EngineTextEncoder:
    """compel's view of one of the model's text encoders (SDXL has two, side by side in the engine's output):
    ids in, its hidden states out, computed by the engines' text-encoder runner."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, runner, index: int, widths: tuple[int, ...]):
        self.runner, self.index, self.widths = runner, index, widths

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise VoltacacheError("the engines' text encoder takes no attention mask (compel's MASK mode)")
        ids = input_ids.to(torch.int32).numpy()
        rows = self.runner.spec.rows_per_image
        feeds = {name: np.repeat(ids, rows, axis=0) for name in TEXT_IDS[: len(self.widths)]}  # a guidance pair
        out = self.runner.infer(feeds)
        start = sum(self.widths[: self.index])
        hidden = torch.from_numpy(out[TEXT_EMBEDDINGS][::rows, :, start : start + self.widths[self.index]].copy())
        pooled = torch.from_numpy(out[POOLED_EMBEDDING][::rows].copy())
        # SD 1.x/2.x read the last hidden state, SDXL the penultimate one: the engine outputs what the U-Net reads
        return SimpleNamespace(last_hidden_state=hidden, hidden_states=(hidden, None), text_embeds=pooled)


def compel_tokenizer(tokenizer):
    """transformers' tokenizer over a runtime.tokenizer.ClipTokenizer's BPE (what compel tokenizes with)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    name = tokenizer.plain.id_to_token
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.plain.to_str()),
        bos_token=name(tokenizer.begin),
        eos_token=name(tokenizer.end),
        pad_token=name(tokenizer.pad),
        model_max_length=tokenizer.max_length,
    )


class PromptWeighting:
    """compel's embeddings of weighted prompts for an export's tokenizers and text encoder geometry."""

    def __init__(self, tokenizers, geometry):
        if geometry.text_widths is None:
            raise VoltacacheError("these engines were exported before prompt weighting; run `voltacache export` again")
        self.tokenizers = [compel_tokenizer(t) for t in tokenizers]
        self.widths = geometry.text_widths

    def embeddings(self, runner, prompt: WeightedPrompt) -> tuple[np.ndarray, np.ndarray | None]:
        """The prompt's weighted hidden states, chunk after chunk: (chunks x 77, width); and for SDXL, whose
        U-Net reads it, the pooled embedding compel gives: of the prompt as written in compel's syntax."""
        from compel.embeddings_provider import (
            DownweightMode,
            EmbeddingsProviderMulti,
            ReturnedEmbeddingsType,
            SplitLongTextMode,
        )

        xl = len(self.widths) > 1
        kind = ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
        if xl:  # SDXL: both encoders' penultimate hidden states
            kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        provider = EmbeddingsProviderMulti(
            self.tokenizers,
            [EngineTextEncoder(runner, i, self.widths) for i in range(len(self.widths))],
            truncate=False,
            downweight_mode=DownweightMode.REMOVE,
            returned_embeddings_type=kind,
            split_long_text_mode=SplitLongTextMode.BRUTAL,
            requires_pooled_mask=[False, True] if xl else None,
        )
        texts, weights = zip(*prompt.fragments)
        with torch.no_grad():
            z = provider.get_embeddings_for_weighted_prompt_fragments([list(texts)], [list(weights)])
            pooled = provider.get_pooled_embeddings([prompt.compel])[0].numpy() if xl else None
        return z[0].numpy(), pooled
