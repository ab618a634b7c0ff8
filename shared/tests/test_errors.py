import grpc
import pytest

from kefu.shared import errors


@pytest.mark.parametrize(
    ("exc", "status", "grpc_status"),
    [
        (errors.BadRequest("x", code="invalid_json"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Unauthenticated("x"), 401, grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDenied("x"), 403, grpc.StatusCode.PERMISSION_DENIED),
        (errors.NotFound("x", code="unknown_conversation"), 404, grpc.StatusCode.NOT_FOUND),
        (errors.Conflict("x"), 409, grpc.StatusCode.ABORTED),
        (errors.PayloadTooLarge("x"), 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.RateLimited("x", retry_after=3), 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("x"), 503, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_error_survives_the_bus_with_its_status(exc, status, grpc_status):
    back = errors.from_headers(exc.to_headers())
    assert type(back) is type(exc)
    assert (back.code, back.message, back.http_status, back.grpc_status) == (exc.code, "x", status, grpc_status)
    assert exc.to_json() == {"error": {"code": exc.code, "message": "x"}}


def test_retry_after_crosses_the_bus():
    back = errors.from_headers(errors.RateLimited("slow down", retry_after=2.5).to_headers())
    assert isinstance(back, errors.RateLimited) and back.retry_after == 2.5


def test_unknown_code_is_internal_and_success_has_no_error():
    assert isinstance(errors.from_code("something_new"), errors.Internal)
    assert errors.from_headers(None) is None
    assert errors.from_headers({"Other": "1"}) is None


def test_a_refined_code_the_receiver_does_not_know_keeps_its_status():
    sent = errors.BadRequest("not a picture", code="invalid_image_v2")
    back = errors.from_headers(sent.to_headers())
    assert isinstance(back, errors.BadRequest) and back.code == "invalid_image_v2" and back.http_status == 400
