# `MIX_ENV=prod mix run bench/keepalive.exs`: the keep-alive stall of issue 26.
# One keep-alive connection, N GET requests in turn: the median round trip.
v1 = Path.expand("test/fixtures/foreign/http_js/http_v1.wasm")
{:ok, _} = Capsid.deploy(:ka, v1, size: 1)
{:ok, server} = Capsid.HTTP.Server.start_link(target: :ka, port: 0)
port = Capsid.HTTP.Server.port(server)
{:ok, s} = :gen_tcp.connect({127, 0, 0, 1}, port, [:binary, active: false, packet: :raw])
req = "GET / HTTP/1.1\r\nhost: x\r\n\r\n"

read = fn read, acc ->
  case :binary.match(acc, "\r\n\r\n") do
    {i, 4} ->
      [_, len] = Regex.run(~r/content-length: (\d+)/i, acc) || [nil, "0"]
      need = i + 4 + String.to_integer(len)

      if byte_size(acc) >= need,
        do: :ok,
        else:
          (
            {:ok, more} = :gen_tcp.recv(s, 0, 5_000)
            read.(read, acc <> more)
          )

    :nomatch ->
      {:ok, more} = :gen_tcp.recv(s, 0, 5_000)
      read.(read, acc <> more)
  end
end

times =
  for _ <- 1..200 do
    {us, :ok} =
      :timer.tc(fn ->
        :ok = :gen_tcp.send(s, req)
        read.(read, "")
      end)

    us
  end

sorted = Enum.sort(times)

IO.puts(
  "keep-alive GET /, 200 requests on one connection: median #{Enum.at(sorted, 100)} us, p90 #{Enum.at(sorted, 180)} us, max #{List.last(sorted)} us"
)
