"""The prepared dataset's records: TFDS features, the record bytes, shard names and metadata.

The workers write the array_record shards themselves (shard i of a split holds what is left of
input lines [i * SHARD_LINES, (i + 1) * SHARD_LINES), so the layout does not depend on how many
workers there are); the main process then writes TFDS's metadata (dataset_info.json,
features.json) with tfds.folder_dataset.write_metadata, which tfds.builder_from_directory and
the data sources read as they read any TFDS dataset. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np

BUILDER_NAME = "s2s_jax_prepared"


def features():
    """The prepared dataset's features (one definition: the metadata and the record bytes)."""
    import tensorflow_datasets as tfds

    seq = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    return tfds.features.FeaturesDict({"source": seq, "target": seq,
                                       "source_text": tfds.features.Text(), "target_text": tfds.features.Text()})


_PROTOS = None


def serialize_record(source_ids, target_ids, source_text: str, target_text: str) -> bytes:
    """One example as the tf.train.Example that `features().serialize_example` builds, built
    with the same protobuf classes without its generic per-feature conversions (3x faster; the
    test pins the two to decode alike). Map entries are written sorted (deterministic=True),
    so the bytes are the same in every process."""
    global _PROTOS
    if _PROTOS is None:
        from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

        _PROTOS = tf_example_pb2.Example, tf_feature_pb2
    example, F = _PROTOS
    return example(features=F.Features(feature={
        "source": F.Feature(int64_list=F.Int64List(value=source_ids)),
        "target": F.Feature(int64_list=F.Int64List(value=target_ids)),
        "source_text": F.Feature(bytes_list=F.BytesList(value=[source_text.encode("utf-8")])),
        "target_text": F.Feature(bytes_list=F.BytesList(value=[target_text.encode("utf-8")])),
    })).SerializeToString(deterministic=True)


def shard_name(role: str, index: int, count: int) -> str:
    # TFDS's default template {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}
    return f"{BUILDER_NAME}-{role}.array_record-{index:05d}-of-{count:05d}"


def write_metadata(folder: str, shards: dict) -> None:
    """dataset_info.json + features.json for the shards in `folder` ({role: [(examples, bytes)]})."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    infos = [tfds.core.SplitInfo(name=role, shard_lengths=[n for n, _ in sh], num_bytes=sum(b for _, b in sh))
             for role, sh in shards.items()]
    banner = io.StringIO()
    with contextlib.redirect_stdout(banner):  # keep stdout clean (the CLI may print JSON there)
        tfds.folder_dataset.write_metadata(
            data_dir=folder, features=features(), split_infos=infos, check_data=False,
            description="s2s_jax prepared parallel text (SentencePiece ids + normalised text).",
            # Corpus order: record i is line i (after drops), so eval batches/BLEU references
            # line up without a separate index.
            disable_shuffling=True)


def tfds_dir(prepared_dir: str) -> str:
    """The TFDS dataset folder (data_dir/name/version) inside a prepared folder."""
    return os.path.join(prepared_dir, "tfds", BUILDER_NAME, "1.0.0")


def open_split(prepared_dir: str, role: str):
    """Random-access data source of a prepared split (tfds.data_source; no TensorFlow)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(tfds_dir(prepared_dir))
    return builder.as_data_source(role)
