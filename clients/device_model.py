"""The device half of a split model.

    token ids -> embed -> device layers (local, adapted with local M) -> cloud layers (via
    the link) -> final norm -> LM head -> logits

The device holds the tokenizer, the embeddings, its own decoder layers, the final norm, the
LM head and every M. Public A and B of its own layers are derived from the seed here, so
nothing of them needs to be downloaded; the cloud's A and B never reach the device.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from plora.clients.cut_noise import CutNoise
from plora.clients.remote import RemoteDecoder
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.privatelora import AdapterWeights, attach, decoder_slice, local_exchange, truncate_cache
from plora.cloud_backbone.protocol.link import SplitLink
from plora.cloud_backbone.protocol.messages import CacheMode
from plora.storage.errors import VersionMismatchError


class _LocalLayers(nn.Module):
    """Decoder layers the device runs itself, adapted with its own M, with their KV cache."""

    def __init__(self, stack: nn.Module, first_layer: int, config: PrivateLoRAConfig, weights: AdapterWeights):
        super().__init__()
        self.stack = stack
        self._slot = attach(stack.layers, first_layer, config)
        self._exchange = local_exchange(weights)
        self._cache: DynamicCache | None = None

    def forward(self, hidden: torch.Tensor, cache: CacheMode, attention_mask: torch.Tensor | None, keep_cached: int | None):
        if cache is CacheMode.START:
            self._cache = DynamicCache(config=self.stack.config)
        if keep_cached is not None and cache is CacheMode.EXTEND:
            truncate_cache(self._cache, keep_cached)
        kept = None if cache is CacheMode.NONE else self._cache
        with self._slot.using(self._exchange):
            return self.stack(inputs_embeds=hidden, attention_mask=attention_mask, cache=kept, use_cache=kept is not None).last_hidden_state


class DeviceModel(nn.Module):
    """A causal LM whose middle runs in the cloud. Only the M matrices are trainable.

    `model` is a causal LM holding the device's decoder layers: the full backbone in embedded
    mode, or the device bundle, whose layers are the first `config.device_layers` followed by
    the last `config.device_last_layers`. Its other layers are ignored. With `cut_noise`, every
    state it sends the cloud at the cut carries fresh noise (clients.cut_noise); `noise_seed`
    fixes the draws, for tests.
    """

    def __init__(self, model: PreTrainedModel, config: PrivateLoRAConfig, link: SplitLink, cut_noise: CutNoise | None = None,
                 noise_seed: int | None = None):
        super().__init__()
        identity = link.identity
        if identity.adapter != config:
            raise VersionMismatchError(f"the cloud serves adapter config {identity.adapter}, this device uses {config}")
        decoder = model.get_decoder()
        self.config = config
        self.embed = decoder.embed_tokens
        self.norm = decoder.norm
        self.lm_head = model.get_output_embeddings()
        self.weights = AdapterWeights(config, identity.num_layers)
        first, last = config.device_layers, config.device_last_layers
        # Where the last layers sit in `model`: at the end of the full backbone, right after
        # the first ones in a bundle.
        last_at = len(decoder.layers) - last if len(decoder.layers) == identity.num_layers else first
        # Its own copies of the layers it adapts: attach() wraps them in place, and `model` may be
        # shared with other devices of this process (clients.public_store).
        self.local = _LocalLayers(copy.deepcopy(decoder_slice(model, 0, first)), 0, config, self.weights) if first else None
        self.tail = (_LocalLayers(copy.deepcopy(decoder_slice(model, last_at, last_at + last)), identity.num_layers - last, config,
                                  self.weights) if last else None)
        self.remote = RemoteDecoder(link, self.weights)
        self.cut_noise = cut_noise
        self._noise_draws = cut_noise.generator(noise_seed) if cut_noise else None
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith("weights."))

    @property
    def link(self) -> SplitLink:
        return self.remote.link

    @contextmanager
    def base_model(self) -> Iterator[None]:
        """Within the block the model is its base model (every M = 0); M is restored after."""
        kept = {name: m.detach().clone() for name, m in self.weights.named_tensors()}
        with torch.no_grad():
            for m in self.weights.parameters():
                m.zero_()
        try:
            yield
        finally:
            self.weights.load_named_tensors(kept)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: CacheMode = CacheMode.NONE,
        attention_mask: torch.Tensor | None = None,
        keep_cached: int | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) final hidden states, after the final norm. With
        `keep_cached`, an EXTEND first drops every cached position after the first keep_cached
        (a rejected draft), here and in the cloud."""
        hidden = self.embed(input_ids)
        if self.local is not None:
            hidden = self.local(hidden, cache, attention_mask, keep_cached)
        if self.cut_noise is not None:
            hidden = self.cut_noise.apply(hidden, self._noise_draws)
        hidden = self.remote(hidden, cache, attention_mask, keep_cached)
        if self.tail is not None:
            hidden = self.tail(hidden, cache, attention_mask, keep_cached)
        return self.norm(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: CacheMode = CacheMode.NONE,
        attention_mask: torch.Tensor | None = None,
        keep_cached: int | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) logits; with `logits_to_keep`, those of the last
        positions only, as Hugging Face's models take it (0: all). A prompt's first token needs
        the last alone, and the LM head over a 128-token prompt costs some 60 ms on 2 cores."""
        hidden = self.hidden_states(input_ids, cache, attention_mask, keep_cached)
        return self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
