"""mlsae-export: our dictionaries in the field's tools. ``mlsae-export saelens`` writes a run as SAELens SAEs
(one per layer, mlsae_train/formats/saelens.py); ``mlsae-export hub`` uploads a run, with a model card, to the
Hugging Face Hub (upload.py), from where ``load_sae("ORG/NAME")`` and ``mlsae-analyse --run ORG/NAME`` fetch it."""
