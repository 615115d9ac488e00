defmodule Capsid.WASI do
  @moduledoc """
  The WASI capabilities of an instance: the `:wasi` option of
  `Capsid.Instance.start_link/1`, pools and deployments. Everything is
  denied unless granted here: no environment variables, no arguments, no
  directories, stdin empty, no sockets, no outbound HTTP. What a guest is
  denied looks to it like something absent (a WASI error code), never like a
  host failure.

      wasi: [
        env: %{"LANG" => "C.UTF-8"},
        args: ["plugin", "--fast"],
        dirs: [{"/srv/plugin-data", "/data", :read_only}],
        stdin: "input bytes",
        clock: {:fixed, ~U[2026-01-01 00:00:00Z]},
        random: {:seed, 42},
        http: [allow: ["api.example.test", "127.0.0.1:4001"]]
      ]

  Options:

    * `:env` — a map (or keyword list) of strings: the guest's environment.
    * `:args` — a list of strings: the guest's command-line arguments.
    * `:dirs` — `{host_path, guest_path, :read_only | :read_write}` each, or
      with options, `{host_path, guest_path, mode, symlinks: false}`: the
      host directory is the guest's `guest_path` (say `"/data"`). The guest
      cannot leave it: `..`, absolute host paths and symlinks that point out
      are refused (wasmtime-wasi resolves every path inside the directory).
      `:read_only` refuses writing, creating, renaming and deleting. The host
      directory must exist when the instance starts. See "Symlinks" below
      for what a guest may leave behind in a `:read_write` directory.
    * `:stdin` — bytes the guest reads from stdin (each store, so after a
      recycle the guest reads them again).
    * `:clock` — `:real` (default) or `{:fixed, %DateTime{}}`: the wall
      clock always shows that time and the monotonic clock stands still.
    * `:random` — `:secure` (default) or `{:seed, n}`: every WASI source of
      randomness (secure, insecure, the insecure seed) derives from `n`, so
      a guest's random choices repeat from one instance to the next.
    * `:http` — outbound `wasi:http/outgoing-handler` requests:
      `[allow: authorities, max_response_body: bytes]`. `allow` lists
      `"host"` (any port) or `"host:port"` (that port only; a URL without a
      port means 80 for `http`, 443 for `https`); names compare
      case-insensitively, with no wildcards and no DNS lookups (an IP
      address is allowed only as written). A request to anything else gets
      wasi:http's `HTTP-request-denied` error code and never leaves the
      host. `max_response_body` (default 16 MiB) caps what the guest reads
      of one response body: beyond it the guest's body stream fails with
      `HTTP-response-body-size`. A request counts against the call's
      `:timeout` like everything the guest waits for: when the call times
      out, its requests are dropped. Default: `[allow: []]`, no request
      leaves. Requests are made with wasmtime-wasi-http's client (HTTP/1.1,
      TLS by rustls with the Mozilla roots for `https`).
    * `:stdout`, `:stderr` — where the guest's output goes after each call:
      `:discard` (the default; stderr still comes with a trap as
      `Capsid.Trap`'s `stderr`), `:capture` (kept by the instance, the
      newest 64 KiB per stream, in `Capsid.Instance.info/1`'s `:stdout` and
      `:stderr`), `:logger` or `{:logger, level}` (a log event per line the
      guest wrote, default level `:info`, with metadata `capsid_instance`
      and `capsid_stream`; see "Output to the log" below), or `{:send, pid}`
      (`{:capsid_output, instance, :stdout | :stderr, bytes}` per call and
      stream). A call keeps at most
      64 KiB per stream; what a guest writes beyond is dropped and counted
      (`[capsid: N more bytes dropped]`).

  ## Symlinks

  In a `:read_write` directory a guest can create a symlink (wasi:filesystem's
  `symlink-at`) whose target is relative and points out of the directory,
  like `../../etc/passwd` (an absolute target is refused). The guest itself
  can never follow it out: wasmtime-wasi (cap-std) resolves every path the
  guest uses inside the directory and refuses a symlink that leaves it. The
  host is not so confined: a host program that later reads the directory
  with ordinary file functions (`File.read/1`, a backup, a web server
  serving it) follows the link to wherever it points, with the host's
  rights. So by default, treat what a guest leaves in a read-write directory
  as hostile: read it with `File.lstat/1` first, or grant the directory
  with `symlinks: false`:

      dirs: [{"/srv/uploads", "/uploads", :read_write, symlinks: false}]

  With `symlinks: false` the guest cannot create a symlink in that directory
  or anywhere below it (also through a subdirectory it opened, or through
  another granted directory that lies inside it): `symlink-at` answers
  `not-permitted`. Nor can it bring one in from elsewhere: a hard link or a
  rename into it from a directory outside it (another grant) is refused with
  `not-permitted`, whatever the entry is. Symlinks the host itself put there
  stay, and the guest cannot follow them out either. Everything else the
  directory grants works as before. The default (`symlinks: true`) is
  wasmtime-wasi's behaviour, unchanged.

  ## Output to the log

  With `:logger`, what the guest writes is text for people to read, not
  data, and the guest must not be able to forge the log around it: each line
  (split at `\\n`; a trailing `\\r` and empty lines left out) is one event,
  at most 1,000 events per call and stream (then one
  `[capsid: N more lines dropped]`). Within a line, tab and printable UTF-8
  stay as they are; ESC shows as `\\e`, other control characters (C0, DEL) as
  `\\xNN`, C1 controls, line/paragraph separators and bidi overrides as
  `\\u{NNNN}`, and a byte that is not UTF-8 as `\\xNN`, so no event holds a
  raw newline or escape sequence. A line longer than 4 KiB (escaped) ends
  with `… [capsid: N more bytes]`. A backslash the guest wrote stays a
  backslash: `\\e` in the log may be the guest's own two characters. Use
  `:capture` or `{:send, pid}` for the exact bytes.

  A guest that calls `exit` ends its call with `%Capsid.Trap{kind: :exit}`
  and its `status` (WASI 0.2's `exit` takes success or failure, so the host
  sees 0 or 1); the instance recycles.

      iex> grant = Capsid.WASI.native!(env: %{"A" => "1"}, args: ["p"])
      iex> elem(grant, 0)
      [{"A", "1"}]
  """

  import Capsid.Options, only: [is_u64: 1]

  @keys [:env, :args, :dirs, :stdin, :clock, :random, :stdout, :stderr, :http]
  @max_response_body 16 * 1024 * 1024
  @levels [:debug, :info, :notice, :warning, :error]
  # `stdout: :logger`: the longest line one log event shows (bytes, escaped),
  # and the most events one call's stream makes.
  @max_log_line 4096
  @max_log_lines 1000

  @type dir ::
          {Path.t(), String.t(), :read_only | :read_write}
          | {Path.t(), String.t(), :read_only | :read_write, [symlinks: boolean()]}
  @type option ::
          {:env, %{String.t() => String.t()} | [{String.t(), String.t()}]}
          | {:args, [String.t()]}
          | {:dirs, [dir()]}
          | {:stdin, binary()}
          | {:clock, :real | {:fixed, DateTime.t()}}
          | {:random, :secure | {:seed, non_neg_integer()}}
          | {:stdout | :stderr, output()}
          | {:http, [allow: [String.t()], max_response_body: pos_integer()]}

  @type output :: :discard | :capture | :logger | {:logger, Logger.level()} | {:send, pid()}

  @doc false
  # The options as the NIF takes them; raises `ArgumentError` naming the
  # option and what was expected.
  @spec native!([option()]) :: tuple()
  def native!(opts) when is_list(opts) do
    Capsid.Options.validate!(opts, @keys, "the :wasi option")
    dirs = Enum.map(list!(Keyword.get(opts, :dirs, []), :dirs), &dir!/1)

    {env!(Keyword.get(opts, :env, [])), strings!(Keyword.get(opts, :args, []), :args),
     Enum.map(dirs, fn {host, guest, read_only, _symlinks} -> {host, guest, read_only} end),
     stdin!(Keyword.get(opts, :stdin)), clock!(Keyword.get(opts, :clock, :real)),
     random!(Keyword.get(opts, :random, :secure)), http!(Keyword.get(opts, :http, [])),
     output!(opts), for({host, _, _, false} <- dirs, do: host)}
  end

  def native!(other) do
    raise ArgumentError,
          "invalid value for :wasi: expected a keyword list (env:, args:, dirs:, stdin:, " <>
            "clock:, random:, stdout:, stderr:, http:), got #{inspect(other)}"
  end

  # `{stdout_kept, stderr_kept, {stdout_mode, stderr_mode}}`.
  defp output!(opts) do
    out = mode!(Keyword.get(opts, :stdout, :discard), :stdout)
    err = mode!(Keyword.get(opts, :stderr, :discard), :stderr)
    {out != :discard, err != :discard, {out, err}}
  end

  defp mode!(mode, _key) when mode in [:discard, :capture], do: mode
  defp mode!(:logger, _key), do: {:logger, :info}
  defp mode!({:logger, level}, _key) when level in @levels, do: {:logger, level}
  defp mode!({:send, pid}, _key) when is_pid(pid), do: {:send, pid}

  defp mode!(other, key) do
    raise ArgumentError,
          "invalid value for wasi: [#{key}: ...]: expected :discard, :capture, :logger, " <>
            "{:logger, level} or {:send, pid}, got #{inspect(other)}"
  end

  @doc false
  # Routes the output of one call (`{{stdout_mode, stderr_mode}, instance,
  # stdout, stderr}` from the NIF), in the calling process.
  def deliver({{out_mode, err_mode}, instance, stdout, stderr}) do
    route(out_mode, instance, :stdout, stdout)
    route(err_mode, instance, :stderr, stderr)
  end

  defp route(_mode, _instance, _stream, ""), do: :ok
  defp route(:discard, _instance, _stream, _bytes), do: :ok

  defp route(:capture, instance, stream, bytes) when is_pid(instance),
    do: send(instance, {:"$capsid_output", stream, bytes})

  # One event per line the guest wrote, each safe to print (`log_line/1`):
  # a guest cannot make one event look like several, or colour the log.
  defp route({:logger, level}, instance, stream, bytes) do
    require Logger
    meta = [capsid_instance: instance, capsid_stream: stream]

    lines =
      bytes
      |> :binary.split("\n", [:global])
      |> Enum.reject(&(&1 in ["", "\r"]))

    {logged, dropped} = Enum.split(lines, @max_log_lines)
    Enum.each(logged, &Logger.log(level, log_line(&1), meta))

    if dropped != [] do
      Logger.log(level, "[capsid: #{length(dropped)} more lines dropped]", meta)
    end
  end

  defp route({:send, pid}, instance, stream, bytes),
    do: send(pid, {:capsid_output, instance, stream, bytes})

  defp route(_mode, _instance, _stream, _bytes), do: :ok

  # A line of guest output as one log event shows it: valid UTF-8 as is,
  # except what a terminal or log viewer acts on: control characters but
  # tab (C0, DEL, C1: ESC as `\e`, others as `\xNN` or `\u{NN}`), line and
  # paragraph separators, and bidi overrides; a byte that is not UTF-8 as
  # `\xNN`; at most `@max_log_line` bytes, then how many were left out.
  defp log_line(line) do
    line =
      if String.ends_with?(line, "\r"), do: binary_part(line, 0, byte_size(line) - 1), else: line

    escape(line, [], 0)
  end

  defp escape(<<>>, acc, _size), do: acc |> Enum.reverse() |> IO.iodata_to_binary()

  defp escape(rest, acc, size) when size >= @max_log_line,
    do: escape(<<>>, acc, size) <> "… [capsid: #{byte_size(rest)} more bytes]"

  defp escape(<<c::utf8, rest::binary>>, acc, size) do
    piece = escape_char(c)
    escape(rest, [piece | acc], size + byte_size(piece))
  end

  defp escape(<<byte, rest::binary>>, acc, size) do
    piece = hex(byte)
    escape(rest, [piece | acc], size + byte_size(piece))
  end

  defp escape_char(?\t), do: "\t"
  defp escape_char(?\e), do: "\\e"
  defp escape_char(c) when c < 0x20 or c == 0x7F, do: hex(c)

  defp escape_char(c)
       when c in 0x80..0x9F or c in 0x2028..0x2029 or c in 0x202A..0x202E or
              c in 0x2066..0x2069,
       do: "\\u{" <> Integer.to_string(c, 16) <> "}"

  defp escape_char(c), do: <<c::utf8>>

  defp hex(byte), do: "\\x" <> String.pad_leading(Integer.to_string(byte, 16), 2, "0")

  defp env!(env) when is_map(env), do: env |> Enum.sort() |> env!()

  defp env!(env) when is_list(env) do
    Enum.map(env, fn
      {k, v} when is_binary(k) and is_binary(v) ->
        if k == "" or String.contains?(k, ["=", <<0>>]) or String.contains?(v, <<0>>) do
          raise ArgumentError,
                "invalid environment variable in wasi: [env: ...]: #{inspect({k, v})} " <>
                  "(a name must be non-empty, without \"=\" or NUL)"
        end

        {k, v}

      other ->
        raise ArgumentError,
              "invalid value in wasi: [env: ...]: expected string => string, got #{inspect(other)}"
    end)
  end

  defp env!(other) do
    raise ArgumentError,
          "invalid value for wasi: [env: ...]: expected a map of strings, got #{inspect(other)}"
  end

  defp strings!(list, key) do
    list
    |> list!(key)
    |> Enum.map(fn
      s when is_binary(s) ->
        s

      other ->
        raise ArgumentError,
              "invalid value in wasi: [#{key}: ...]: expected a string, got #{inspect(other)}"
    end)
  end

  defp list!(list, _key) when is_list(list), do: list

  defp list!(other, key) do
    raise ArgumentError,
          "invalid value for wasi: [#{key}: ...]: expected a list, got #{inspect(other)}"
  end

  defp dir!({host, guest, mode}), do: dir!({host, guest, mode, []})

  defp dir!({host, guest, mode, opts} = dir)
       when is_binary(host) and is_binary(guest) and mode in [:read_only, :read_write] and
              is_list(opts) do
    Capsid.Options.validate!(opts, [:symlinks], "a directory's options in wasi: [dirs: ...]")

    symlinks =
      case Keyword.get(opts, :symlinks, true) do
        allow when is_boolean(allow) ->
          allow

        other ->
          raise ArgumentError,
                "invalid value for symlinks: in wasi: [dirs: ...]: expected true or false, " <>
                  "got #{inspect(other)} (in #{inspect(dir)})"
      end

    unless File.dir?(host) do
      raise ArgumentError,
            "invalid directory in wasi: [dirs: ...]: #{inspect(host)} does not exist " <>
              "or is not a directory (in #{inspect(dir)})"
    end

    unless String.starts_with?(guest, "/") do
      raise ArgumentError,
            "invalid directory in wasi: [dirs: ...]: the guest path #{inspect(guest)} " <>
              "must be absolute, like \"/data\""
    end

    {Path.expand(host), guest, mode == :read_only, symlinks}
  end

  defp dir!(other) do
    raise ArgumentError,
          "invalid value in wasi: [dirs: ...]: expected {host_path, guest_path, " <>
            ":read_only | :read_write} or {host_path, guest_path, :read_only | :read_write, " <>
            "symlinks: false}, got #{inspect(other)}"
  end

  defp stdin!(nil), do: nil
  defp stdin!(bytes) when is_binary(bytes), do: bytes

  defp stdin!(other) do
    raise ArgumentError,
          "invalid value for wasi: [stdin: ...]: expected a binary, got #{inspect(other)}"
  end

  defp clock!(:real), do: nil

  defp clock!({:fixed, %DateTime{} = at}) do
    ns = DateTime.to_unix(at, :nanosecond)

    if ns < 0 do
      raise ArgumentError,
            "invalid value for wasi: [clock: ...]: #{inspect(at)} is before 1970"
    end

    {div(ns, 1_000_000_000), rem(ns, 1_000_000_000)}
  end

  defp clock!(other) do
    raise ArgumentError,
          "invalid value for wasi: [clock: ...]: expected :real or {:fixed, %DateTime{}}, " <>
            "got #{inspect(other)}"
  end

  # `{allowed_authorities, max_response_body}`, authorities lower-cased.
  defp http!(opts) when is_list(opts) do
    Capsid.Options.validate!(opts, [:allow, :max_response_body], "wasi: [http: ...]")

    allow =
      case Keyword.get(opts, :allow, []) do
        list when is_list(list) ->
          Enum.map(list, &authority!/1)

        other ->
          raise ArgumentError,
                "invalid value for wasi: [http: [allow: ...]]: expected a list, " <>
                  "got #{inspect(other)}"
      end

    max =
      case Keyword.get(opts, :max_response_body, @max_response_body) do
        n when is_u64(n) and n > 0 ->
          n

        other ->
          raise ArgumentError,
                "invalid value for wasi: [http: [max_response_body: ...]]: expected a " <>
                  "positive integer (bytes), got #{inspect(other)}"
      end

    {allow, max}
  end

  defp http!(other) do
    raise ArgumentError,
          "invalid value for wasi: [http: ...]: expected a keyword list like " <>
            "[allow: [\"api.example.test\", \"127.0.0.1:4001\"]], got #{inspect(other)}"
  end

  # "host" or "host:port": no scheme, path, user info or wildcard.
  defp authority!(a) when is_binary(a) do
    down = String.downcase(a)

    {host, port} =
      case Regex.run(~r/\A(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::([0-9]{1,5}))?\z/, down) do
        [_, host] -> {host, nil}
        [_, host, port] -> {host, String.to_integer(port)}
        nil -> {nil, nil}
      end

    if host == nil or (port != nil and port > 65_535) do
      raise ArgumentError,
            "invalid authority in wasi: [http: [allow: ...]]: #{inspect(a)}; expected " <>
              "\"host\" or \"host:port\" (no scheme, path or wildcard), like " <>
              "\"api.example.test\" or \"127.0.0.1:4001\""
    end

    down
  end

  defp authority!(other) do
    raise ArgumentError,
          "invalid authority in wasi: [http: [allow: ...]]: expected a string like " <>
            "\"api.example.test\" or \"127.0.0.1:4001\", got #{inspect(other)}"
  end

  defp random!(:secure), do: nil

  defp random!({:seed, n}) when is_u64(n),
    do: n

  defp random!(other) do
    raise ArgumentError,
          "invalid value for wasi: [random: ...]: expected :secure or {:seed, n} " <>
            "(n a 64-bit non-negative integer), got #{inspect(other)}"
  end
end
