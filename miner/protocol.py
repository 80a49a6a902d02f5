"""The subnet's ImageSynapse, defined here because the subnet's package is not a dependency. Wire-compatible with
natix.protocol (2.0.4): the class name is the Axon route (/ImageSynapse), the fields and defaults are the same, and
like the subnet's it hashes no body field (required_hash_fields stays empty): a validator signs the hash of an empty
field list, so an Axon that hashed `image` would refuse every real request as a body-hash mismatch."""
import functools

import pydantic

from miner.bt import Synapse


class ImageSynapse(Synapse):
    testnet_label: int = -1  # the ground truth, sent only on testnet
    image: str = pydantic.Field(default="", title="Image", description="the street image, base64 JPEG",
                                frozen=False)
    prediction: float = pydantic.Field(default=-1.0, title="Prediction",
                                       description="P(roadwork) in [0, 1] filled by the miner; -1 means no answer",
                                       frozen=False)

    def deserialize(self) -> float:
        return self.prediction

    def get_required_fields(self) -> list[str]:
        """What bittensor computes (the class's JSON schema's `required`), once per class: bittensor 9.12 rebuilds
        that schema ~10 times per to_headers(), which cost ~0.2 s of CPU per request here (pydantic 2.13)."""
        return list(_required_fields(type(self)))


@functools.cache
def _required_fields(cls: type) -> tuple[str, ...]:
    return tuple(cls.model_json_schema().get("required", []))
