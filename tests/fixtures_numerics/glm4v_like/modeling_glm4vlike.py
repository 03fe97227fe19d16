"""GLM-4V-like remote code: the vision forward casts the image to a dtype of its own choosing
(bfloat16) before a conv whose weights follow the model's dtype. In plain
transformers with dtype=float16 this fails: "Input type (BFloat16) and bias type (Half)"."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_glm4vlike import Glm4vLikeConfig


class PatchEmbed(nn.Module):
    def __init__(self, config):
        super().__init__()
        v = config.vision_config
        self.proj = nn.Conv2d(v["num_channels"], config.hidden_size, v["patch_size"], stride=v["patch_size"])

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)


class Vision(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch_embed = PatchEmbed(config)

    def forward(self, images):
        images = images.to(dtype=torch.bfloat16)  # the remote code's own choice of dtype
        return self.patch_embed(images)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class TextModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))

    def forward(self, h):
        for block in self.layers:
            h = block(h)
        return h


class Glm4vLikeForCausalLM(PreTrainedModel):
    config_class = Glm4vLikeConfig
    base_model_prefix = "glm4v_like"

    def __init__(self, config):
        super().__init__(config)
        self.model = TextModel(config)
        self.vision = Vision(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, pixel_values=None, **kwargs):
        h = self.model.embed(input_ids)
        if pixel_values is not None:
            img = self.vision(pixel_values).to(h.dtype)
            h = torch.cat([img, h], dim=1)
        h = self.model(h)
        return CausalLMOutput(logits=self.lm_head(h))
