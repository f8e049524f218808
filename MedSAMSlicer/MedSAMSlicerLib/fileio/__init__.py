"""Reading and writing files: volumes (NIfTI, NRRD, MetaImage, DICOM), their integrity, orientation, `.seg.nrrd`, and the one atomic writer."""
