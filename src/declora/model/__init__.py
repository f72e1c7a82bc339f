"""The one frozen base model: loading, PEFT methods and trainable state, quantized bases."""
