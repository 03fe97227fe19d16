"""InternVL-like remote code, tiny: a ViT-style vision tower (`vision_model`), an MLP projector
(`mlp1`: LayerNorm, Linear, GELU, Linear, as InternVL's) and a Llama language model
(`language_model`). Image tokens are prepended to the text embeddings."""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_internvllike import InternVLLikeConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.patch_embedding = nn.Conv2d(v["num_channels"], v["hidden_size"], v["patch_size"], stride=v["patch_size"])
        n = (v["image_size"] // v["patch_size"]) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, n, v["hidden_size"]) * 0.02)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return x + self.position_embedding.to(x.dtype)


class VisionLayer(nn.Module):
    def __init__(self, v):
        super().__init__()
        d = v["hidden_size"]
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, v["intermediate_size"])
        self.fc2 = nn.Linear(v["intermediate_size"], d)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class VisionModel(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.embeddings = VisionEmbeddings(v)
        self.layers = nn.ModuleList([VisionLayer(v)])

    def forward(self, pixel_values):
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return x


class InternVLLikeForCausalLM(PreTrainedModel):
    config_class = InternVLLikeConfig
    base_model_prefix = "internvl_like"
    _no_split_modules = ["VisionLayer", "LlamaDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        v, t = config.vision_config, config.llm_config
        self.vision_model = VisionModel(v)
        self.mlp1 = nn.Sequential(nn.LayerNorm(v["hidden_size"]), nn.Linear(v["hidden_size"], t["hidden_size"]),
                                  nn.GELU(), nn.Linear(t["hidden_size"], t["hidden_size"]))
        self.language_model = LlamaForCausalLM(LlamaConfig(**t))
        self.post_init()

    def forward(self, input_ids, pixel_values=None, **kwargs):
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            img = self.mlp1(self.vision_model(pixel_values))
            embeds = torch.cat([img.to(embeds.dtype), embeds], dim=1)
        out = self.language_model(inputs_embeds=embeds, use_cache=False)
        return CausalLMOutput(logits=out.logits)
