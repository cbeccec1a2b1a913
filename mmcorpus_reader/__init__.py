"""Training-time reader of mmcorpus packed shards (Parquet / WebDataset); imports no Beam, torch optional."""

from mmcorpus_reader.reader import PackDataset, collate_packs, render_pack_text, shuffle_order

__all__ = ["PackDataset", "collate_packs", "render_pack_text", "shuffle_order"]
