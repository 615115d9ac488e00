defmodule Capsid.HTTP.Server.Connection do
  @moduledoc false
  # One client connection of `Capsid.HTTP.Server`: reads requests one after
  # another (keep-alive), each through `Capsid.HTTP.Server.Parser`, runs the
  # component for each well-formed one (`Capsid.HTTP.Server.Handler`) and
  # writes its answer. A request the parser refuses is answered with its
  # status and the connection is closed: nothing after it on the
  # connection is read as a request.

  alias Capsid.HTTP.Server.{Handler, Parser}

  # A request's head and body must arrive within this (from the moment the
  # server starts waiting for it, keep-alive idle time included): a client
  # that trickles bytes (slowloris) holds a connection no longer.
  @request_timeout 60_000
  # After an error answer, how long unread bytes are still drained, so that
  # closing does not reset the connection before the client reads it.
  @linger 1_000
  @linger_bytes 65_536

  @methods ~w(GET HEAD POST PUT PATCH DELETE TRACE)

  @doc false
  # Started by the server, linked to it; the socket follows in a message
  # once this process owns it.
  def start_link(config), do: spawn_link(fn -> await_socket(config) end)

  defp await_socket(config) do
    receive do
      {:socket, socket} -> serve(%{config: config, socket: socket, buffer: ""})
    after
      5_000 -> :ok
    end
  end

  defp serve(conn) do
    deadline = System.monotonic_time(:millisecond) + @request_timeout

    case request(conn, deadline) do
      {:ok, request, keep_alive?, conn} ->
        {status, headers, body} = Handler.answer(conn.config, request)
        close? = not keep_alive?
        :ok = send_bytes(conn, Handler.encode(status, headers, body, request.method, close?))

        if close?, do: close(conn), else: serve(conn)

      {:refuse, status, why, conn} ->
        Handler.refused(conn.config, status, why)
        {status, headers, body} = Handler.plain(status)
        _ = send_bytes(conn, Handler.encode(status, headers, body, "GET", true))
        close(conn)

      :closed ->
        :gen_tcp.close(conn.socket)
    end
  end

  # `{:ok, request, keep_alive?, conn}`, `{:refuse, status, why, conn}`, or
  # `:closed` (the client left, or stayed silent, between requests).
  defp request(conn, deadline) do
    max = conn.config

    case read(conn, deadline, &Parser.head(&1, max.max_uri_size, max.max_header_size)) do
      {:ok, {head, rest}, conn} ->
        conn = %{conn | buffer: rest}

        with {:ok, framing} <- check(head, max.max_body),
             :ok <- continue(conn, head),
             {:ok, body, conn} <- body(conn, framing, deadline) do
          {:ok, to_request(head, body), keep_alive?(head), conn}
        else
          {:error, status, why} -> {:refuse, status, why, conn}
          {:error, status, why, conn} -> {:refuse, status, why, conn}
        end

      {:error, status, why, conn} ->
        {:refuse, status, why, conn}

      {:eof, %{buffer: ""}} ->
        :closed

      {:eof, conn} ->
        {:refuse, 400, "the connection ended inside a request head", conn}

      {:timeout, %{buffer: ""}} ->
        :closed

      {:timeout, conn} ->
        {:refuse, 408, "the request head did not arrive in time", conn}
    end
  end

  defp check(head, max_body) do
    hosts = for {"host", v} <- head.headers, do: v

    cond do
      head.method not in @methods or (head.method == "TRACE" and head.version == :"1.0") ->
        {:error, 501, "the method #{inspect(head.method, limit: 4)} is not served"}

      head.version == :"1.1" and length(hosts) != 1 ->
        {:error, 400, "an HTTP/1.1 request needs exactly one Host header"}

      match?({:error, _}, Handler.path(head.target)) ->
        {:error, 400, "a request target that is not a path (or an http URL)"}

      true ->
        case Parser.framing(head) do
          {:length, n} when n > max_body ->
            {:error, 413, "the body is larger than #{max_body} bytes"}

          {:error, _, _} = error ->
            error

          framing ->
            expect(head, framing)
        end
    end
  end

  defp expect(head, framing) do
    case for({"expect", v} <- head.headers, do: String.downcase(v, :ascii)) do
      [] -> {:ok, framing}
      ["100-continue"] when head.version == :"1.1" -> {:ok, {:continue, framing}}
      _ -> {:error, 417, "an Expect header other than 100-continue"}
    end
  end

  # The body is wanted: a client waiting for 100 Continue may send it.
  defp continue(conn, %{version: :"1.1"} = head) do
    if Enum.any?(head.headers, &match?({"expect", _}, &1)),
      do: send_bytes(conn, "HTTP/1.1 100 Continue\r\n\r\n"),
      else: :ok
  end

  defp continue(_conn, _head), do: :ok

  defp body(conn, {:continue, framing}, deadline), do: body(conn, framing, deadline)

  defp body(conn, {:length, 0}, _deadline), do: {:ok, "", conn}

  defp body(conn, {:length, n}, deadline) do
    take = fn
      <<body::binary-size(n), rest::binary>> -> {:ok, {body, rest}}
      _ -> :more
    end

    case read(conn, deadline, take) do
      {:ok, {body, rest}, conn} ->
        {:ok, body, %{conn | buffer: rest}}

      {:eof, conn} ->
        {:error, 400,
         "the connection ended after #{byte_size(conn.buffer)} of the #{n} bytes its Content-Length announced",
         conn}

      {:timeout, conn} ->
        {:error, 408, "the body did not arrive in time", conn}
    end
  end

  defp body(conn, :chunked, deadline), do: chunked(conn, Parser.chunked(), deadline)

  defp chunked(conn, state, deadline) do
    case Parser.chunked(state, conn.buffer, conn.config.max_body) do
      {:ok, body, rest} ->
        {:ok, body, %{conn | buffer: rest}}

      {:error, status, why} ->
        {:error, status, why, conn}

      {:more, state, rest} ->
        case recv(conn.socket, deadline) do
          {:ok, data} -> chunked(%{conn | buffer: rest <> data}, state, deadline)
          :eof -> {:error, 400, "the connection ended inside a chunked body", conn}
          :timeout -> {:error, 408, "the body did not arrive in time", conn}
        end
    end
  end

  # Applies `parse` to the buffer, receiving more while it says `:more`.
  defp read(conn, deadline, parse) do
    case parse.(conn.buffer) do
      {:ok, head, rest} ->
        {:ok, {head, rest}, conn}

      {:ok, result} ->
        {:ok, result, conn}

      {:error, status, why} ->
        {:error, status, why, conn}

      :more ->
        case recv(conn.socket, deadline) do
          {:ok, data} -> read(%{conn | buffer: conn.buffer <> data}, deadline, parse)
          :eof -> {:eof, conn}
          :timeout -> {:timeout, conn}
        end
    end
  end

  defp recv(socket, deadline) do
    case max(deadline - System.monotonic_time(:millisecond), 0) do
      0 ->
        :timeout

      wait ->
        case :gen_tcp.recv(socket, 0, wait) do
          {:ok, data} -> {:ok, data}
          {:error, :timeout} -> :timeout
          {:error, _} -> :eof
        end
    end
  end

  defp send_bytes(conn, iodata) do
    case :gen_tcp.send(conn.socket, iodata) do
      :ok -> :ok
      {:error, _} -> exit(:normal)
    end
  end

  # HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 closes.
  defp keep_alive?(%{version: :"1.0"}), do: false

  defp keep_alive?(head) do
    not Enum.any?(head.headers, fn {name, value} ->
      name == "connection" and
        value
        |> String.downcase(:ascii)
        |> String.split(",")
        |> Enum.any?(&(String.trim(&1) == "close"))
    end)
  end

  defp to_request(head, body) do
    {:ok, path} = Handler.path(head.target)
    %{method: head.method, target: head.target, path: path, headers: head.headers, body: body}
  end

  # Closes after an answer. Bytes the client sent that were not read (a
  # refused request's body, what followed it) would make the kernel reset
  # the connection, and the client might lose the answer: they are drained
  # first, briefly and up to a bound.
  defp close(conn) do
    _ = :gen_tcp.shutdown(conn.socket, :write)
    drain(conn.socket, System.monotonic_time(:millisecond) + @linger, @linger_bytes)
    :gen_tcp.close(conn.socket)
  end

  defp drain(_socket, _deadline, left) when left <= 0, do: :ok

  defp drain(socket, deadline, left) do
    case recv(socket, deadline) do
      {:ok, data} -> drain(socket, deadline, left - byte_size(data))
      _ -> :ok
    end
  end
end
