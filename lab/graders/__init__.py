"""The lab graders: one pytest file per lab, comparing a student's functions with stored reference outputs."""
