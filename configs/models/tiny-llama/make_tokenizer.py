"""Rebuild this folder's tiny tokenizer offline: a byte-level BPE (any text encodes, no unknown token)
trained on the fixed sentences below, with Llama's ``<s>`` / ``</s>`` and deliberately NO padding
token (the tower must add one and say so). Run: ``python configs/models/tiny-llama/make_tokenizer.py``.
The model itself is ``config.json`` here, built by ``transformers`` with random weights (no download).
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 384
CORPUS = [
    "The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. Small left pleural effusion. Right lower lobe opacity, likely atelectasis.",
    "No acute cardiopulmonary abnormality. Stable mediastinal contour. Degenerative changes of the spine.",
    "Moderate pulmonary edema with bilateral interstitial opacities. Endotracheal tube 4 cm above the carina.",
    "Large right pneumothorax. Nasogastric tube in the stomach. Sternotomy wires are intact.",
    "Findings: there is no focal consolidation. Impression: no evidence of pneumonia.",
    "Calcified granuloma in the left upper lobe. A 5 mm nodule is unchanged. Hyperinflation, COPD.",
    "Severe congestive heart failure. Blunting of the costophrenic angles. Central venous catheter.",
]


def build(out_dir: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   model_max_length=512)
    fast.save_pretrained(out_dir)


if __name__ == "__main__":
    build(Path(__file__).resolve().parent)
