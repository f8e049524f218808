"""The MRML side of MedSAM: MRML nodes in, engine calls, segments out; no Qt.

``MRMLBridge`` (volumes, boxes and ROIs in RAS, labelmaps, preview, undo, the bridge),
``headless`` (a scene and module logics without the Slicer application, for scripts and tests)
and ``compat`` (supported Slicer versions and Python requirements) need only ``slicer``, so they
run in Slicer and on the ``slicer-core`` wheel alike.

The Segment Editor effect is NOT in this package: Slicer loads an effect file under the name of
the folder that holds it (``qSlicerSegmentEditorScriptedEffect::setPythonSource``), replacing any
package of that name in ``sys.modules``. The effect therefore lives alone in
``SegmentEditorMedSAMLib/``, a folder that is not a package.
"""
