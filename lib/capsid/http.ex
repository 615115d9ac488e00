defmodule Capsid.HTTP do
  @moduledoc """
  Serves `wasi:http/proxy` components: components that export
  `wasi:http/incoming-handler` (what `wasmtime serve`, Spin and wasmCloud
  run, and what componentize-js builds from a `fetch` handler), whatever
  toolchain built them.

      {:ok, _} = Capsid.deploy(:hello, "priv/hello_http.wasm")

      {:ok, %{status: 200, headers: headers, body: body}} =
        Capsid.HTTP.handle(:hello, %{
          method: "POST",
          path: "/echo?x=1",
          headers: [{"x-agent", "curl"}],
          body: "hi"
        })

  The target is anything `Capsid.call/4` takes: an instance pid or name, a
  pool, a deployment (a hot swap changes what is served with no failed
  request). `Capsid.HTTP.Server` serves a target on a TCP port.

  The request runs as one call of the target, under its limits (`:timeout`,
  `:fuel`, `:max_memory`), queued like any call. The guest's response body
  is read while the guest writes it, up to `:max_body` bytes.

  ## One request per instance

  Many guest runtimes answer exactly one request per instance (a
  componentize-js component answers a second request on the same instance
  with nothing at all), so by default every request gets a fresh instance:
  the instance's store is dropped once the guest has answered, and the next
  request instantiates the component again (`instance: :fresh`). A guest
  that can serve many requests from one instance (most Rust ones) can keep
  it with `instance: :reuse`. A guest that returns from `handle` without
  answering is a `%Capsid.Trap{kind: :other}` that says so, and its instance
  recycles.

  ## Errors

    * `%Capsid.Trap{}`: the guest trapped, timed out (`:timeout`), ran out
      of fuel or memory, answered with a wasi:http error code, did not
      answer, or wrote more than `:max_body` (`:memory_limit`).
    * `%Capsid.Error{}`: the target was not found or busy (`:busy`), the
      component does not export `wasi:http/incoming-handler`
      (`:unknown_function`), or the request was invalid (`:bad_argument`).
  """

  alias Capsid.Error

  import Capsid.Options, only: [is_u64: 1]

  @max_body 16 * 1024 * 1024

  @typedoc """
  A request. `:method` is a string (`"GET"`, or any token) or an atom
  (`:get`); `:path` is the path and query, starting with `/`. `:headers`
  (default `[]`) are `{name, value}` binaries; `:body` (default `""`) is
  iodata. The guest sees the URL `scheme://authority/path`: `:scheme`
  defaults to `:http`, `:authority` to the request's `host` header, else
  `"localhost"`.
  """
  @type request :: %{
          required(:method) => String.t() | atom(),
          required(:path) => String.t(),
          optional(:headers) => [{String.t(), binary()}],
          optional(:body) => iodata(),
          optional(:scheme) => :http | :https,
          optional(:authority) => String.t()
        }

  @typedoc "The guest's response: header names are lower-case."
  @type response :: %{
          status: 100..999,
          headers: [{String.t(), binary()}],
          body: binary()
        }

  @type option ::
          {:instance, :fresh | :reuse}
          | {:max_body, pos_integer()}
          | {:timeout, non_neg_integer() | :infinity}
          | {:fuel, pos_integer()}
          | {:max_memory, pos_integer()}
          | {:queue_timeout, non_neg_integer() | :infinity}

  @doc """
  Serves `request` with the component of `target`.

  Options:

    * `:instance` — `:fresh` (default: the instance is dropped after the
      request; see "One request per instance") or `:reuse`.
    * `:max_body` — the largest response body, in bytes (default 16 MiB).
    * `:timeout`, `:fuel`, `:max_memory`, `:queue_timeout` — as for
      `Capsid.call/4`. The timeout covers the whole exchange: the guest's
      work, its outbound requests, and writing its response body.

  ## Examples

      iex> Capsid.HTTP.handle(self(), %{method: "GET", path: "no-slash"})
      {:error, %Capsid.Error{kind: :bad_argument, message: ~s(invalid :path "no-slash": expected a binary starting with "/", like "/echo?x=1")}}
  """
  @spec handle(Capsid.Instance.target(), request(), [option()]) ::
          {:ok, response()} | {:error, Exception.t()}
  def handle(target, request, opts \\ []) do
    with {:ok, native} <- native_request(request),
         {:ok, http_opts, call_opts} <- options(opts) do
      case Capsid.Call.call(target, "[http]", [native, http_opts], call_opts) do
        {:ok, {status, headers, body}} ->
          {:ok, %{status: status, headers: headers, body: body}}

        {:error, _} = error ->
          error
      end
    end
  end

  @doc """
  Like `handle/3`, but returns the response or raises the error.
  """
  @spec handle!(Capsid.Instance.target(), request(), [option()]) :: response()
  def handle!(target, request, opts \\ []) do
    case handle(target, request, opts) do
      {:ok, response} -> response
      {:error, error} -> raise error
    end
  end

  defp options(opts) when is_list(opts) do
    {instance, opts} = Keyword.pop(opts, :instance, :fresh)
    {max_body, call_opts} = Keyword.pop(opts, :max_body, @max_body)

    cond do
      instance not in [:fresh, :reuse] ->
        bad(":instance", "expected :fresh or :reuse", instance)

      not (is_u64(max_body) and max_body > 0) ->
        bad(":max_body", "expected a positive integer (bytes)", max_body)

      true ->
        {:ok, {instance == :fresh, max_body}, call_opts}
    end
  end

  defp options(other), do: bad("options", "expected a keyword list", other)

  # `{method, scheme, authority, path, headers, body}` for the NIF.
  defp native_request(%{method: method, path: path} = request) do
    headers = Map.get(request, :headers, [])

    with {:ok, method} <- method(method),
         :ok <- path(path),
         {:ok, headers} <- headers(headers),
         {:ok, body} <- body(Map.get(request, :body, "")),
         {:ok, scheme} <- scheme(Map.get(request, :scheme, :http)),
         {:ok, authority} <- authority(Map.get(request, :authority), headers) do
      {:ok, {method, scheme, authority, path, headers, body}}
    end
  end

  defp native_request(other),
    do: bad("request", "expected a map with :method and :path", other)

  defp method(m) when is_atom(m) and m not in [nil, true, false],
    do: method(m |> Atom.to_string() |> String.upcase())

  defp method(m) when is_binary(m) do
    if m =~ ~r/\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\z/,
      do: {:ok, m},
      else: bad(":method", "expected an HTTP method token like \"GET\"", m)
  end

  defp method(m), do: bad(":method", "expected a string like \"GET\" or an atom", m)

  defp path("/" <> _), do: :ok

  defp path(p),
    do: bad(":path", ~s(expected a binary starting with "/", like "/echo?x=1"), p)

  defp headers(headers) when is_list(headers) do
    if Enum.all?(headers, &match?({k, v} when is_binary(k) and is_binary(v), &1)),
      do: {:ok, headers},
      else: bad(":headers", "expected a list of {name, value} binaries", headers)
  end

  defp headers(other), do: bad(":headers", "expected a list of {name, value} binaries", other)

  defp body(body) do
    {:ok, IO.iodata_to_binary(body)}
  rescue
    ArgumentError -> bad(":body", "expected iodata", body)
  end

  defp scheme(s) when s in [:http, :https], do: {:ok, Atom.to_string(s)}
  defp scheme(s), do: bad(":scheme", "expected :http or :https", s)

  defp authority(a, _headers) when is_binary(a), do: {:ok, a}

  defp authority(nil, headers) do
    case Enum.find(headers, fn {k, _} -> String.downcase(k) == "host" end) do
      {_, host} -> {:ok, host}
      nil -> {:ok, "localhost"}
    end
  end

  defp authority(a, _headers), do: bad(":authority", "expected a string like \"example.test\"", a)

  defp bad(what, expected, got) do
    {:error, Error.new(:bad_argument, "invalid #{what} #{inspect(got, limit: 5)}: #{expected}")}
  end
end
