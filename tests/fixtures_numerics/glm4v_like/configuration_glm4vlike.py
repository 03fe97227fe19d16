from transformers import PretrainedConfig


class Glm4vLikeConfig(PretrainedConfig):
    model_type = "glm4v_like"

    def __init__(self, vocab_size=160, hidden_size=64, intermediate_size=128, num_layers=2,
                 vision_config=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_layers = num_layers
        self.vision_config = vision_config or {"image_size": 16, "num_channels": 3, "patch_size": 4}
        super().__init__(**kwargs)
