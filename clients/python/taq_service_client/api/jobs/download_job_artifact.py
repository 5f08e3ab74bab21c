from http import HTTPStatus
from typing import Any, cast
from urllib.parse import quote

import httpx

from ... import errors
from ...client import AuthenticatedClient, Client
from ...models.error_response import ErrorResponse
from ...types import UNSET, Response, Unset


def _get_kwargs(
    job_id: str,
    name: str,
    *,
    range_: None | str | Unset = UNSET,
    if_none_match: None | str | Unset = UNSET,
    if_range: None | str | Unset = UNSET,
) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    if not isinstance(range_, Unset):
        headers["range"] = range_

    if not isinstance(if_none_match, Unset):
        headers["if-none-match"] = if_none_match

    if not isinstance(if_range, Unset):
        headers["if-range"] = if_range

    _kwargs: dict[str, Any] = {
        "method": "get",
        "url": "/v1/jobs/{job_id}/artifacts/{name}".format(
            job_id=quote(str(job_id), safe=""),
            name=quote(str(name), safe=""),
        ),
    }

    _kwargs["headers"] = headers
    return _kwargs


def _parse_response(*, client: AuthenticatedClient | Client, response: httpx.Response) -> Any | ErrorResponse | None:
    if response.status_code == 200:
        response_200 = response.json()
        return response_200

    if response.status_code == 206:
        response_206 = cast(Any, None)
        return response_206

    if response.status_code == 304:
        response_304 = cast(Any, None)
        return response_304

    if response.status_code == 307:
        response_307 = cast(Any, None)
        return response_307

    if response.status_code == 400:
        response_400 = ErrorResponse.from_dict(response.json())

        return response_400

    if response.status_code == 401:
        response_401 = ErrorResponse.from_dict(response.json())

        return response_401

    if response.status_code == 404:
        response_404 = ErrorResponse.from_dict(response.json())

        return response_404

    if response.status_code == 416:
        response_416 = cast(Any, None)
        return response_416

    if response.status_code == 422:
        response_422 = ErrorResponse.from_dict(response.json())

        return response_422

    if response.status_code == 429:
        response_429 = ErrorResponse.from_dict(response.json())

        return response_429

    if response.status_code == 503:
        response_503 = ErrorResponse.from_dict(response.json())

        return response_503

    if client.raise_on_unexpected_status:
        raise errors.UnexpectedStatus(response.status_code, response.content)
    else:
        return None


def _build_response(*, client: AuthenticatedClient | Client, response: httpx.Response) -> Response[Any | ErrorResponse]:
    return Response(
        status_code=HTTPStatus(response.status_code),
        content=response.content,
        headers=response.headers,
        parsed=_parse_response(client=client, response=response),
    )


def sync_detailed(
    job_id: str,
    name: str,
    *,
    client: AuthenticatedClient,
    range_: None | str | Unset = UNSET,
    if_none_match: None | str | Unset = UNSET,
    if_range: None | str | Unset = UNSET,
) -> Response[Any | ErrorResponse]:
    """Download Job Artifact

     Download one artifact (`Range`, `ETag`); a directory (`hf`) comes as a streamed .tar.

    Args:
        job_id (str):
        name (str):
        range_ (None | str | Unset):
        if_none_match (None | str | Unset):
        if_range (None | str | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Any | ErrorResponse]
    """

    kwargs = _get_kwargs(
        job_id=job_id,
        name=name,
        range_=range_,
        if_none_match=if_none_match,
        if_range=if_range,
    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)


def sync(
    job_id: str,
    name: str,
    *,
    client: AuthenticatedClient,
    range_: None | str | Unset = UNSET,
    if_none_match: None | str | Unset = UNSET,
    if_range: None | str | Unset = UNSET,
) -> Any | ErrorResponse | None:
    """Download Job Artifact

     Download one artifact (`Range`, `ETag`); a directory (`hf`) comes as a streamed .tar.

    Args:
        job_id (str):
        name (str):
        range_ (None | str | Unset):
        if_none_match (None | str | Unset):
        if_range (None | str | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Any | ErrorResponse
    """

    return sync_detailed(
        job_id=job_id,
        name=name,
        client=client,
        range_=range_,
        if_none_match=if_none_match,
        if_range=if_range,
    ).parsed


async def asyncio_detailed(
    job_id: str,
    name: str,
    *,
    client: AuthenticatedClient,
    range_: None | str | Unset = UNSET,
    if_none_match: None | str | Unset = UNSET,
    if_range: None | str | Unset = UNSET,
) -> Response[Any | ErrorResponse]:
    """Download Job Artifact

     Download one artifact (`Range`, `ETag`); a directory (`hf`) comes as a streamed .tar.

    Args:
        job_id (str):
        name (str):
        range_ (None | str | Unset):
        if_none_match (None | str | Unset):
        if_range (None | str | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Any | ErrorResponse]
    """

    kwargs = _get_kwargs(
        job_id=job_id,
        name=name,
        range_=range_,
        if_none_match=if_none_match,
        if_range=if_range,
    )

    response = await client.get_async_httpx_client().request(**kwargs)

    return _build_response(client=client, response=response)


async def asyncio(
    job_id: str,
    name: str,
    *,
    client: AuthenticatedClient,
    range_: None | str | Unset = UNSET,
    if_none_match: None | str | Unset = UNSET,
    if_range: None | str | Unset = UNSET,
) -> Any | ErrorResponse | None:
    """Download Job Artifact

     Download one artifact (`Range`, `ETag`); a directory (`hf`) comes as a streamed .tar.

    Args:
        job_id (str):
        name (str):
        range_ (None | str | Unset):
        if_none_match (None | str | Unset):
        if_range (None | str | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Any | ErrorResponse
    """

    return (
        await asyncio_detailed(
            job_id=job_id,
            name=name,
            client=client,
            range_=range_,
            if_none_match=if_none_match,
            if_range=if_range,
        )
    ).parsed
