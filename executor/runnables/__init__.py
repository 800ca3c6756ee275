"""What can be run: a plain typed function (our codec) or an SDK task (the SDK's own machinery).

Each runnable offers the same four steps, so the pipeline can time and classify them alike:
    session(invocation)   context for the whole run (SDK execution context, raw-output prefix)
    decode_inputs(map)    LiteralMap -> prepared inputs
    call(prepared)        run the user's code
    encode_outputs(value) -> {file name: protobuf message} to write under the output prefix
"""
