"""The byte vocabulary and the ids that frame documents, shared by data, model and generation.

A byte model reads raw UTF-8 bytes: 256 ids, with two bytes that never occur in valid UTF-8
reserved to frame documents. A token model (the BPE baseline) gets its BOS id from its
tokenizer; hnet.io.tokenizer always puts <|bos|> first, at TOKEN_BOS_ID.
"""

BYTE_VOCAB_SIZE = 256
BOS_ID = 254  # 0xFE: put before every document; a position holding it starts a document
EOS_ID = 255  # 0xFF: the model may emit it to end generation (packing never inserts it)
TOKEN_BOS_ID = 0  # hnet.io.tokenizer's <|bos|> (its first special token)
