"""napari plugin for calm-rt (npe2 manifest: ``napari.yaml``).

The live closed-loop view is not built yet; the manifest is registered so the
plugin is discoverable and validates.
"""
