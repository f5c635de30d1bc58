"""The shapes world: procedural images of flat coloured shapes with scored captions (`world`), an analyzer that
reads such images back (`analyzer`), and a prompt-following benchmark over them (`evaluate`).

It is the training set and the yardstick of the small model shipped with the package. Importing this package
loads neither torch nor a model.
"""
