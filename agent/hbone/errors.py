"""RFC 9113 section 7 error codes, so callers need not import h2."""

from __future__ import annotations

import h2.errors

NO_ERROR = int(h2.errors.ErrorCodes.NO_ERROR)
PROTOCOL_ERROR = int(h2.errors.ErrorCodes.PROTOCOL_ERROR)
INTERNAL_ERROR = int(h2.errors.ErrorCodes.INTERNAL_ERROR)
FLOW_CONTROL_ERROR = int(h2.errors.ErrorCodes.FLOW_CONTROL_ERROR)
FRAME_SIZE_ERROR = int(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
REFUSED_STREAM = int(h2.errors.ErrorCodes.REFUSED_STREAM)
CANCEL = int(h2.errors.ErrorCodes.CANCEL)
COMPRESSION_ERROR = int(h2.errors.ErrorCodes.COMPRESSION_ERROR)
# RFC 9113 section 8.5: the TCP connection behind a CONNECT stream failed or was reset.
CONNECT_ERROR = int(h2.errors.ErrorCodes.CONNECT_ERROR)
# The peer is flooding us (rapid reset, control-frame floods): what the field answers.
ENHANCE_YOUR_CALM = int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
