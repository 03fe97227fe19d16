from transformers import PretrainedConfig


class InternVLLikeConfig(PretrainedConfig):
    model_type = "internvl_like"

    def __init__(self, vision_config=None, llm_config=None, **kwargs):
        self.vision_config = vision_config or {"image_size": 16, "num_channels": 3, "patch_size": 4,
                                               "hidden_size": 32, "intermediate_size": 64}
        self.llm_config = llm_config or {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
                                         "max_position_embeddings": 64, "tie_word_embeddings": False}
        self.vocab_size = self.llm_config["vocab_size"]
        super().__init__(**kwargs)
