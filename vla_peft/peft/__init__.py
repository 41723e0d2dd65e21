"""PEFT modules and their injection into LLaVA-style VLMs. Knows nothing of robots."""
