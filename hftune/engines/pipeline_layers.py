"""How the pipeline engine (hftune/engines/pipeline.py) cuts a model into DeepSpeed pipeline layers,
per model family: embedding, each transformer block, final norm, head. Each layer takes and returns
what crosses a stage boundary (tensors only), and wraps the loaded HF modules, so the pretrained
weights are the ones trained. A model whose input and output embeddings are tied keeps them tied
across stages (DeepSpeed TiedLayerSpec: the first and last stage hold the embedding and sum its
gradients). Packed causal-LM blocks pass per-text position ids along, so texts stay apart.
"""

from dataclasses import dataclass
from typing import Callable

from torch import nn
from torch.nn import functional as F
from transformers.loss.loss_utils import ForCausalLMLoss, ForSequenceClassificationLoss
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from hftune.errors import HftuneError

TIED = "tied_embedding"  # TiedLayerSpec key of a tied input/output embedding


# ---- layers: each takes and returns what crosses a stage boundary (tensors only) ----


class Embedding(nn.Module):
    """(input_ids, *rest) -> (embeddings, *rest); wraps the model's own nn.Embedding."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, inputs):
        return (self.embedding(inputs[0]), *inputs[1:])


def tied_head(embedding_layer, hidden):
    """The output projection of a tied model: the input embedding's weight, on the last stage."""
    return F.linear(hidden, embedding_layer.embedding.weight)


class Head(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden):
        return self.head(hidden)


class FinalNorm(nn.Module):
    """(hidden, mask, positions) -> hidden: neither is needed past the last block."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, inputs):
        return self.norm(inputs[0])


def causal_mask(config, hidden, mask, positions, packed):
    """The 4-D causal mask of one block, rebuilt on each stage as the model's forward builds it once.
    Packed blocks (isolate_texts) carry no padding: without a 2-D mask, transformers' masking_utils
    finds where texts start from their position ids and keeps each to itself, as in one process."""
    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None if packed else mask,
                              past_key_values=None, position_ids=positions)


class LlamaBlock(nn.Module):
    """A decoder layer: (hidden, mask, positions) -> the same, its rotary embeddings from the positions."""

    def __init__(self, layer, rotary, config, packed):
        super().__init__()
        self.layer, self.rotary, self.config, self.packed = layer, rotary, config, packed

    def forward(self, inputs):
        hidden, mask, positions = inputs
        causal = causal_mask(self.config, hidden, mask, positions, self.packed)
        rotary = self.rotary(hidden, position_ids=positions)
        hidden = self.layer(hidden, attention_mask=causal, position_ids=positions, position_embeddings=rotary)
        return hidden, mask, positions


class GPT2Positions(nn.Module):
    """Adds GPT-2's learned position embeddings (and its embedding dropout)."""

    def __init__(self, wpe, drop):
        super().__init__()
        self.wpe, self.drop = wpe, drop

    def forward(self, inputs):
        hidden, mask, positions = inputs
        return self.drop(hidden + self.wpe(positions)), mask, positions


class GPT2Block(nn.Module):
    def __init__(self, block, config, packed):
        super().__init__()
        self.block, self.config, self.packed = block, config, packed

    def forward(self, inputs):
        hidden, mask, positions = inputs
        causal = causal_mask(self.config, hidden, mask, positions, self.packed)
        return self.block(hidden, None, causal, use_cache=False, position_ids=positions), mask, positions


class BertEmbed(nn.Module):
    """(input_ids, mask, token_type_ids) -> (embeddings, mask)."""

    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, inputs):
        input_ids, mask, token_types = inputs
        return self.embeddings(input_ids=input_ids, token_type_ids=token_types), mask


class BertBlock(nn.Module):
    def __init__(self, layer, config):
        super().__init__()
        self.layer, self.config = layer, config

    def forward(self, inputs):
        hidden, mask = inputs
        extended = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        return self.layer(hidden, extended), mask


class BertClassifierHead(nn.Module):
    """Pooler (first token), dropout, classifier: BertForSequenceClassification's head."""

    def __init__(self, pooler, dropout, classifier):
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

    def forward(self, inputs):
        return self.classifier(self.dropout(self.pooler(inputs[0])))


def _decoder(model, blocks, norm, extra=()):
    """embedding, extra layers, blocks, final norm, head; a tied head reuses the embedding's weight."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is embedding.weight:
        from deepspeed.pipe import TiedLayerSpec

        first = TiedLayerSpec(TIED, Embedding, embedding, tied_weight_attr="embedding.weight")
        last = TiedLayerSpec(TIED, Embedding, embedding, forward_fn=tied_head, tied_weight_attr="embedding.weight")
    else:
        first, last = Embedding(embedding), Head(head)
    return [first, *extra, *blocks, FinalNorm(norm), last]


def llama_layers(model, packed):
    base = model.model
    blocks = [LlamaBlock(layer, base.rotary_emb, model.config, packed) for layer in base.layers]
    return _decoder(model, blocks, base.norm)


def gpt2_layers(model, packed):
    base = model.transformer
    blocks = [GPT2Block(block, model.config, packed) for block in base.h]
    return _decoder(model, blocks, base.ln_f, extra=[GPT2Positions(base.wpe, base.drop)])


def bert_classifier_layers(model, packed=False):
    base = model.bert
    return [BertEmbed(base.embeddings), *(BertBlock(layer, model.config) for layer in base.encoder.layer),
            BertClassifierHead(base.pooler, model.dropout, model.classifier)]


def causal_lm_loss(model, items):
    """Token-weighted as Trainer's: `items()` is the step's token count over its micro-batches and
    replicas, scaled so that DeepSpeed's division by both gives sum / tokens (None: the batch's mean,
    as in evaluation)."""
    return lambda logits, labels: ForCausalLMLoss(logits, labels, vocab_size=model.config.vocab_size,
                                                  num_items_in_batch=items())


def classifier_loss(model, items):
    return lambda logits, labels: ForSequenceClassificationLoss(labels, logits, model.config)


@dataclass(frozen=True)
class Family:
    layers: Callable  # (model, packed) -> pipeline layers; packed: blocks whose position ids restart per text
    loss: Callable  # (model, items) -> loss_fn(outputs, labels); items() -> the step's token count or None
    inputs: tuple  # batch keys fed to the first stage, in order


DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")
FAMILIES = {
    "LlamaForCausalLM": Family(llama_layers, causal_lm_loss, DECODER_INPUTS),
    "GPT2LMHeadModel": Family(gpt2_layers, causal_lm_loss, DECODER_INPUTS),
    "BertForSequenceClassification": Family(bert_classifier_layers, classifier_loss,
                                            ("input_ids", "attention_mask", "token_type_ids")),
}


def family_of(model):
    name = type(model).__name__
    if name not in FAMILIES:
        raise HftuneError(f"engine: pipeline cannot split {name}; it supports {sorted(FAMILIES)}. "
                          "Use engine: trainer (DDP or DeepSpeed ZeRO) for this model.")
    return FAMILIES[name]
