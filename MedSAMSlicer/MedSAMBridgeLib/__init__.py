"""The Slicer side of MedSAM: the Segment Editor effect and the MRML bridge.

``MRMLBridge`` and ``headless`` need only ``slicer`` (slicer-core works); the effect
(``SegmentEditorEffect.py``) needs the Slicer application and is loaded by file path through
``qSlicerSegmentEditorScriptedEffect.setPythonSource``, so it is deliberately not imported here.
"""
