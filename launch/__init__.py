"""The server's launcher (launch/serve.py), installed with afd so that ``afd serve`` runs from
a non-editable install; ``torchrun ... launch/serve.py`` still runs it as a script."""
