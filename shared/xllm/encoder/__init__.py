"""The encode role of hybrid EPD (report §3.3): a vision tower behind `encoder_cmd(id)`.

Two processes serve it with the same code: the encoder service (`services.encoder`, the
tower alone) and an instance started with `--serve-encode` (ED+P: the decode instances
encode too, with the tower weights their model already holds). `EncodeRole` is that code;
each process supplies only its tower and the thread to run it on.
"""
