defmodule Capsid.Guests do
  @moduledoc """
  Paths of the guest components built from `guest/` (the example `toolkit`
  and the test fixtures), placed in `priv/guests/` by `mix compile`.

      iex> Capsid.Guests.path(:toolkit) |> Path.basename()
      "toolkit.wasm"
  """

  @doc "The path of the built guest component `name`."
  @spec path(atom() | String.t()) :: Path.t()
  def path(name), do: Path.join([:code.priv_dir(:capsid), "guests", "#{name}.wasm"])
end
