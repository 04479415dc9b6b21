"""Course labs: handouts that build a LLaMA one idea at a time, a student version made from the reference
code, and graders that compare a student's functions with stored reference outputs.

Instructors: lab/README.md. Students: the handouts of their version (one NN_topic.md per lab, e.g. lab/01_rmsnorm.md).
"""
