"""Reading, normalizing and validating training data.

Every reader and layout ends in one of four canonical record shapes (see :mod:`records`):
conversations for SFT, preference pairs, unpaired feedback, and text pairs for contrastive
training. Rows that cannot be used are quarantined with their source line and a reason.
"""
