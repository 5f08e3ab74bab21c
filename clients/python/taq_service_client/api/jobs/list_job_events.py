from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import httpx

from ... import errors
from ...client import AuthenticatedClient, Client
from ...models.error_response import ErrorResponse
from ...models.event_out import EventOut
from ...types import UNSET, Response, Unset


def _get_kwargs(
    job_id: str,
    *,
    after: int | Unset = 0,
    last_event_id: int | None | Unset = UNSET,
) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    if not isinstance(last_event_id, Unset):
        headers["Last-Event-ID"] = last_event_id

    params: dict[str, Any] = {}

    params["after"] = after

    params = {k: v for k, v in params.items() if v is not UNSET and v is not None}

    _kwargs: dict[str, Any] = {
        "method": "get",
        "url": "/v1/jobs/{job_id}/events".format(
            job_id=quote(str(job_id), safe=""),
        ),
        "params": params,
    }

    _kwargs["headers"] = headers
    return _kwargs


def _parse_response(
    *, client: AuthenticatedClient | Client, response: httpx.Response
) -> ErrorResponse | list[EventOut] | None:
    if response.status_code == 200:
        response_200 = []
        _response_200 = response.json()
        for response_200_item_data in _response_200:
            response_200_item = EventOut.from_dict(response_200_item_data)

            response_200.append(response_200_item)

        return response_200

    if response.status_code == 400:
        response_400 = ErrorResponse.from_dict(response.json())

        return response_400

    if response.status_code == 401:
        response_401 = ErrorResponse.from_dict(response.json())

        return response_401

    if response.status_code == 404:
        response_404 = ErrorResponse.from_dict(response.json())

        return response_404

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


def _build_response(
    *, client: AuthenticatedClient | Client, response: httpx.Response
) -> Response[ErrorResponse | list[EventOut]]:
    return Response(
        status_code=HTTPStatus(response.status_code),
        content=response.content,
        headers=response.headers,
        parsed=_parse_response(client=client, response=response),
    )


def sync_detailed(
    job_id: str,
    *,
    client: AuthenticatedClient,
    after: int | Unset = 0,
    last_event_id: int | None | Unset = UNSET,
) -> Response[ErrorResponse | list[EventOut]]:
    """List Job Events

     Progress events; `Accept: text/event-stream` streams them until the job finishes (at most
    TAQ_MAX_STREAMS_PER_TENANT open per tenant: 429 with Retry-After over it).

    Args:
        job_id (str):
        after (int | Unset):  Default: 0.
        last_event_id (int | None | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[ErrorResponse | list[EventOut]]
    """

    kwargs = _get_kwargs(
        job_id=job_id,
        after=after,
        last_event_id=last_event_id,
    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)


def sync(
    job_id: str,
    *,
    client: AuthenticatedClient,
    after: int | Unset = 0,
    last_event_id: int | None | Unset = UNSET,
) -> ErrorResponse | list[EventOut] | None:
    """List Job Events

     Progress events; `Accept: text/event-stream` streams them until the job finishes (at most
    TAQ_MAX_STREAMS_PER_TENANT open per tenant: 429 with Retry-After over it).

    Args:
        job_id (str):
        after (int | Unset):  Default: 0.
        last_event_id (int | None | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        ErrorResponse | list[EventOut]
    """

    return sync_detailed(
        job_id=job_id,
        client=client,
        after=after,
        last_event_id=last_event_id,
    ).parsed


async def asyncio_detailed(
    job_id: str,
    *,
    client: AuthenticatedClient,
    after: int | Unset = 0,
    last_event_id: int | None | Unset = UNSET,
) -> Response[ErrorResponse | list[EventOut]]:
    """List Job Events

     Progress events; `Accept: text/event-stream` streams them until the job finishes (at most
    TAQ_MAX_STREAMS_PER_TENANT open per tenant: 429 with Retry-After over it).

    Args:
        job_id (str):
        after (int | Unset):  Default: 0.
        last_event_id (int | None | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[ErrorResponse | list[EventOut]]
    """

    kwargs = _get_kwargs(
        job_id=job_id,
        after=after,
        last_event_id=last_event_id,
    )

    response = await client.get_async_httpx_client().request(**kwargs)

    return _build_response(client=client, response=response)


async def asyncio(
    job_id: str,
    *,
    client: AuthenticatedClient,
    after: int | Unset = 0,
    last_event_id: int | None | Unset = UNSET,
) -> ErrorResponse | list[EventOut] | None:
    """List Job Events

     Progress events; `Accept: text/event-stream` streams them until the job finishes (at most
    TAQ_MAX_STREAMS_PER_TENANT open per tenant: 429 with Retry-After over it).

    Args:
        job_id (str):
        after (int | Unset):  Default: 0.
        last_event_id (int | None | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        ErrorResponse | list[EventOut]
    """

    return (
        await asyncio_detailed(
            job_id=job_id,
            client=client,
            after=after,
            last_event_id=last_event_id,
        )
    ).parsed
