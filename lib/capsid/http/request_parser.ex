defmodule Capsid.HTTP.Server.Parser do
  @moduledoc false
  # The strict HTTP/1.1 request parser of `Capsid.HTTP.Server` (RFC 9112),
  # on raw bytes. It normalises nothing it could disagree about with a
  # proxy in front: what another parser might read differently is a 400,
  # never a guess (see the server's "Request framing" docs). Each function
  # takes the bytes received so far and returns `:more` when it needs more.

  # tchar (RFC 9110 §5.6.2): the bytes of a token.
  tchar = ~c"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
  @tchar tchar

  # A chunk-size line, a trailer line: longer is an attack, not a request.
  @max_chunk_line 4_096
  # All of a chunked body's trailer lines: read and dropped, but bounded.
  @max_trailers 10_240
  # Digits of a Content-Length or chunk size: 15 decimal digits, 15 hex ones
  # (way past any body limit, never a bignum).
  @max_digits 15

  @type head :: %{
          method: binary(),
          target: binary(),
          version: :"1.0" | :"1.1",
          headers: [{binary(), binary()}]
        }

  @type error :: {:error, 400..599, String.t()}

  ## The head: request line and header fields

  @doc false
  # `{:ok, head, rest}`, `:more` or `{:error, status, why}`. `max_uri` and
  # `max_header` bound the request line's target and the header section.
  @spec head(binary(), pos_integer(), pos_integer()) :: {:ok, head(), binary()} | :more | error()
  def head(buffer, max_uri, max_header) do
    # RFC 9112 §2.2: empty lines before a request line are ignored.
    buffer = skip_empty_lines(buffer)

    case :binary.match(buffer, "\r\n\r\n") do
      {at, 4} ->
        <<head::binary-size(at), _::binary-size(4), rest::binary>> = buffer

        with :ok <- line_breaks(head <> "\r\n"),
             [line | fields] = :binary.split(head, "\r\n", [:global]),
             {:ok, method, target, version} <- request_line(line, max_uri),
             :ok <- header_size(byte_size(head) - byte_size(line), max_header),
             {:ok, headers} <- fields(fields, []) do
          {:ok, %{method: method, target: target, version: version, headers: headers}, rest}
        end

      :nomatch ->
        incomplete(buffer, max_uri, max_header)
    end
  end

  # A few: an endless stream of them is not a request.
  defp skip_empty_lines(buffer, n \\ 4)
  defp skip_empty_lines(<<"\r\n", rest::binary>>, n) when n > 0, do: skip_empty_lines(rest, n - 1)
  defp skip_empty_lines(buffer, _n), do: buffer

  # Not a whole head yet: wait for more, unless what came already breaks a
  # rule (a lone CR or LF) or a limit.
  defp incomplete(buffer, max_uri, max_header) do
    # A CR at the very end may be followed by its LF.
    checked =
      if String.ends_with?(buffer, "\r"),
        do: binary_part(buffer, 0, byte_size(buffer) - 1),
        else: buffer

    with :ok <- line_breaks(checked) do
      case :binary.match(buffer, "\r\n") do
        :nomatch when byte_size(buffer) > max_uri + 64 ->
          {:error, 414, "the request line is longer than #{max_uri} bytes"}

        :nomatch ->
          :more

        {at, _} when at > max_uri + 64 ->
          {:error, 414, "the request line is longer than #{max_uri} bytes"}

        {at, _} ->
          if byte_size(buffer) - at > max_header,
            do: {:error, 431, "the header section is longer than #{max_header} bytes"},
            else: :more
      end
    end
  end

  # Every line ends in CRLF: a CR or LF alone is read as a line break by
  # some parsers and not by others.
  defp line_breaks(bytes) do
    bare_lf =
      :binary.matches(bytes, "\n")
      |> Enum.any?(fn {at, _} -> at == 0 or :binary.at(bytes, at - 1) != ?\r end)

    bare_cr =
      :binary.matches(bytes, "\r")
      |> Enum.any?(fn {at, _} -> at + 1 >= byte_size(bytes) or :binary.at(bytes, at + 1) != ?\n end)

    if bare_lf or bare_cr,
      do: {:error, 400, "a CR or LF outside a CRLF line ending"},
      else: :ok
  end

  defp header_size(size, max) when size > max,
    do: {:error, 431, "the header section is longer than #{max} bytes"}

  defp header_size(_size, _max), do: :ok

  defp request_line(line, max_uri) do
    case :binary.split(line, " ", [:global]) do
      [method, target, version] ->
        cond do
          not token?(method) ->
            {:error, 400, "the method is not a token"}

          byte_size(target) > max_uri ->
            {:error, 414, "the request target is longer than #{max_uri} bytes"}

          target == "" or not visible?(target) ->
            {:error, 400, "the request target is empty or has bytes other than visible ASCII"}

          true ->
            case version do
              "HTTP/1.1" ->
                {:ok, method, target, :"1.1"}

              "HTTP/1.0" ->
                {:ok, method, target, :"1.0"}

              <<"HTTP/", d, ".", e>> when d in ?0..?9 and e in ?0..?9 ->
                {:error, 505, "HTTP version not supported"}

              _ ->
                {:error, 400, "a malformed HTTP version"}
            end
        end

      _ ->
        {:error, 400, "a request line is a method, a target and a version, separated by one space"}
    end
  end

  # A field line: `name ":" OWS value OWS`, the name a token right against
  # the colon. A line starting with whitespace continues the previous one
  # (obs-fold): refused, as is whitespace between name and colon (RFC 9112
  # §5.1, §5.2).
  defp fields([], acc), do: {:ok, Enum.reverse(acc)}

  defp fields([<<c, _::binary>> | _], _acc) when c in [?\s, ?\t],
    do: {:error, 400, "a header line folded onto the previous one (obs-fold)"}

  defp fields([line | rest], acc) do
    with {:ok, field} <- field(line), do: fields(rest, [field | acc])
  end

  @doc false
  # One field line (also a chunked body's trailer): `{:ok, {lower_name, value}}`.
  def field(line) do
    case :binary.split(line, ":") do
      [name, value] ->
        value = trim(value)

        cond do
          not token?(name) ->
            {:error, 400,
             "the header name #{inspect(name, limit: 8, printable_limit: 64)} is not a token " <>
               "right against its colon"}

          not field_value?(value) ->
            {:error, 400, "the value of header #{name} has control characters"}

          true ->
            {:ok, {String.downcase(name, :ascii), value}}
        end

      [_] ->
        {:error, 400, "a header line without a colon"}
    end
  end

  ## Framing: how long the body is

  @doc false
  # `{:length, n}`, `:chunked` or an error, from the Content-Length and
  # Transfer-Encoding fields (RFC 9112 §6).
  @spec framing(head()) :: {:length, non_neg_integer()} | :chunked | error()
  def framing(%{headers: headers, version: version}) do
    te = for {"transfer-encoding", v} <- headers, do: v
    cl = for {"content-length", v} <- headers, do: v

    cond do
      te != [] and cl != [] ->
        {:error, 400, "both Content-Length and Transfer-Encoding"}

      te != [] and version == :"1.0" ->
        {:error, 400, "Transfer-Encoding in an HTTP/1.0 request"}

      te != [] ->
        case list(te) do
          [coding] ->
            if String.downcase(coding, :ascii) == "chunked",
              do: :chunked,
              else: {:error, 400, "a Transfer-Encoding other than chunked"}

          _ ->
            {:error, 400, "a Transfer-Encoding other than chunked alone"}
        end

      cl != [] ->
        case Enum.uniq(list(cl)) do
          [value] ->
            if digits?(value) and byte_size(value) <= @max_digits,
              do: {:length, String.to_integer(value)},
              else: {:error, 400, "a Content-Length that is not a decimal number of bytes"}

          [] ->
            {:error, 400, "an empty Content-Length"}

          _ ->
            {:error, 400, "Content-Length values that disagree"}
        end

      true ->
        {:length, 0}
    end
  end

  # A field's value as a comma-separated list (also over several lines).
  defp list(values) do
    values |> Enum.flat_map(&:binary.split(&1, ",", [:global])) |> Enum.map(&trim/1)
  end

  ## A chunked body (RFC 9112 §7.1)

  @doc false
  # The decoder's state: where it is, the body so far (iodata) and its size.
  def chunked, do: %{at: :size, body: [], size: 0, trailers: 0}

  @doc false
  # Consumes what it can of `buffer`: `{:ok, body, rest}`, `{:more, state,
  # rest}` (rest: the bytes it could not use yet) or an error. Linear in the
  # bytes received, however they are split.
  def chunked(%{at: :size} = state, buffer, max_body) do
    case line(buffer) do
      {:ok, line, rest} ->
        {size, ext} = take_hex(line, 0, 0)

        cond do
          size == :error or not chunk_ext?(ext) ->
            {:error, 400, "a malformed chunk size line"}

          state.size + size > max_body ->
            {:error, 413, "the body is larger than #{max_body} bytes"}

          size == 0 ->
            chunked(%{state | at: :trailers}, rest, max_body)

          true ->
            chunked(%{state | at: {:data, size}}, rest, max_body)
        end

      other ->
        more(other, state, buffer)
    end
  end

  def chunked(%{at: {:data, left}} = state, buffer, max_body) do
    case buffer do
      <<data::binary-size(left), rest::binary>> ->
        state = %{state | at: :crlf, body: [state.body, data], size: state.size + left}
        chunked(state, rest, max_body)

      partial ->
        n = byte_size(partial)
        state = %{state | at: {:data, left - n}, body: [state.body, partial], size: state.size + n}
        {:more, state, ""}
    end
  end

  def chunked(%{at: :crlf} = state, buffer, max_body) do
    case buffer do
      <<"\r\n", rest::binary>> -> chunked(%{state | at: :size}, rest, max_body)
      short when byte_size(short) < 2 and short in ["", "\r"] -> {:more, state, buffer}
      _ -> {:error, 400, "a chunk's data is not followed by CRLF"}
    end
  end

  # Trailer fields are checked like header fields, and dropped.
  def chunked(%{at: :trailers} = state, buffer, max_body) do
    case line(buffer) do
      {:ok, "", rest} ->
        {:ok, IO.iodata_to_binary(state.body), rest}

      {:ok, <<c, _::binary>>, _rest} when c in [?\s, ?\t] ->
        {:error, 400, "a trailer line folded onto the previous one (obs-fold)"}

      {:ok, line, rest} ->
        trailers = state.trailers + byte_size(line)

        with {:ok, _} <- field(line) do
          if trailers > @max_trailers,
            do: {:error, 431, "the trailers are longer than #{@max_trailers} bytes"},
            else: chunked(%{state | trailers: trailers}, rest, max_body)
        end

      other ->
        more(other, state, buffer)
    end
  end

  defp more(:more, state, buffer), do: {:more, state, buffer}
  defp more(error, _state, _buffer), do: error

  # A CRLF-terminated line of a chunked body.
  defp line(buffer) do
    case :binary.match(buffer, "\r\n") do
      {at, 2} when at <= @max_chunk_line ->
        <<line::binary-size(at), _::binary-size(2), rest::binary>> = buffer

        with :ok <- line_breaks(line <> "\r\n"), do: {:ok, line, rest}

      {_, 2} ->
        {:error, 400, "a chunk line longer than #{@max_chunk_line} bytes"}

      :nomatch when byte_size(buffer) > @max_chunk_line ->
        {:error, 400, "a chunk line longer than #{@max_chunk_line} bytes"}

      :nomatch ->
        checked =
          if String.ends_with?(buffer, "\r"),
            do: binary_part(buffer, 0, byte_size(buffer) - 1),
            else: buffer

        with :ok <- line_breaks(checked), do: :more
    end
  end

  defp take_hex(<<c, rest::binary>>, acc, n) when n < @max_digits and c in ?0..?9,
    do: take_hex(rest, acc * 16 + c - ?0, n + 1)

  defp take_hex(<<c, rest::binary>>, acc, n) when n < @max_digits and c in ?a..?f,
    do: take_hex(rest, acc * 16 + c - ?a + 10, n + 1)

  defp take_hex(<<c, rest::binary>>, acc, n) when n < @max_digits and c in ?A..?F,
    do: take_hex(rest, acc * 16 + c - ?A + 10, n + 1)

  defp take_hex(_rest, _acc, 0), do: {:error, ""}

  defp take_hex(<<c, _::binary>>, _acc, _n) when c in ?0..?9 or c in ?a..?f or c in ?A..?F,
    do: {:error, ""}

  defp take_hex(rest, acc, _n), do: {acc, rest}

  # `*( BWS ";" BWS name [ BWS "=" BWS value ] )`: accepted and ignored, as
  # long as it starts with a `;` and has no control characters.
  defp chunk_ext?(""), do: true
  defp chunk_ext?(ext), do: String.starts_with?(trim(ext), ";") and field_value?(ext)

  ## Bytes

  defp token?(""), do: false
  defp token?(bytes), do: all?(bytes, &(&1 in @tchar))

  defp visible?(bytes), do: all?(bytes, &(&1 in 0x21..0x7E))

  defp digits?(""), do: false
  defp digits?(bytes), do: all?(bytes, &(&1 in ?0..?9))

  # VCHAR, obs-text, SP and HTAB: no NUL, CR, LF or other control.
  defp field_value?(bytes), do: all?(bytes, &(&1 == ?\t or &1 in 0x20..0x7E or &1 >= 0x80))

  defp all?(<<c, rest::binary>>, ok?), do: ok?.(c) and all?(rest, ok?)
  defp all?(<<>>, _ok?), do: true

  defp trim(bytes), do: bytes |> trim_leading() |> trim_trailing()

  defp trim_leading(<<c, rest::binary>>) when c in [?\s, ?\t], do: trim_leading(rest)
  defp trim_leading(bytes), do: bytes

  defp trim_trailing(""), do: ""

  defp trim_trailing(bytes) do
    case :binary.last(bytes) do
      c when c in [?\s, ?\t] -> trim_trailing(binary_part(bytes, 0, byte_size(bytes) - 1))
      _ -> bytes
    end
  end
end
