"""Jobs: preheat (files and images), get_task, delete_task, get_image_distribution and
sync_peers, from the API to the schedulers and back.

- `args.py`: the requests as Dragonfly shapes them (Harbor's included), validated,
  defaulted, and split into what is shown and what is sealed;
- `secrets.py`: passwords and headers sealed in the job row;
- `image.py`: manifests, indexes, platforms and registry auth (parsing, no I/O);
- `resolve.py`: a manifest URL to the blobs to preheat (the registry client);
- `store.py`: job rows and their parts (one per scheduler cluster), claims, states, GC;
- `render.py`: the JSON Dragonfly answers with;
- `runner.py`: the loop that claims parts and runs them through a scheduler.
"""
