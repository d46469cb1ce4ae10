"""The publish stage: merging the best adapter into the base model and checking the merged
weights before anything is published."""
